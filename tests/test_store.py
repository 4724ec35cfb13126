"""The SQLite store: schema and migrations, group commit, the operations;
devices, sessions and timelines of contract version 2 (schema 4)."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from im58d.store.accounts import add_user_txn, make_friends_txn, set_disabled_txn
from im58d.store.inbox import deliver_txn
from im58d.store.interfaces import (
    DUPLICATE,
    KIND_GROUP,
    KIND_USER,
    REFUSED,
    STORED,
    Conflict,
    NotFound,
    StoreError,
)
from im58d.store.sessions import sign_in_txn
from im58d.store.sqlite import (
    SQLiteStore,
    migrate,
    open_database,
    schema_scripts,
    schema_version,
)

from .support import ImmediateThread, memory_store

TABLES = {
    "users", "messages", "inboxes", "inbox", "list_versions", "categories", "friends",
    "friend_requests", "groups", "group_members", "report_counts", "report_users",
    "report_batches", "devices", "sessions",
}
SCHEMA = 4
KEY = bytes(range(32))
DEV_A = b"device-a-0000001"
DEV_B = b"device-b-0000002"
DEV_C = b"device-c-0000003"


def sid(n: int) -> bytes:
    """The 16-byte id of a test's n-th session."""
    return f"session-{n:08d}".encode()


def nonce(n: int) -> bytes:
    """A RESUME nonce: 8 bytes, big-endian."""
    return n.to_bytes(8, "big")


class SchemaTests(SynchronousTestCase):
    def test_new_database(self) -> None:
        """A new database gets every table and the newest schema version, 4:
        devices and sessions tables, messages keyed by (sender, device, cmid)
        with the sender's seq, two more list versions, a base_seq per inbox."""
        db = open_database(":memory:")
        self.assertTrue(TABLES <= set(db.table_names()))
        self.assertEqual(schema_version(db), schema_scripts()[-1][0])
        self.assertEqual(schema_version(db), SCHEMA)
        columns = {t: set(db[t].columns_dict) for t in
                   ("devices", "sessions", "messages", "inboxes", "list_versions")}
        self.assertEqual(columns["devices"], {"id", "uid", "device_id", "name", "acked"})
        self.assertEqual(columns["sessions"], {
            "id", "device", "uid", "key", "token", "client", "nonce", "created",
            "last_active", "online"})
        self.assertTrue({"device", "cmid", "sender_seq"} <= columns["messages"])
        self.assertIn("base_seq", columns["inboxes"])
        self.assertTrue({"request_list", "device_list"} <= columns["list_versions"])
        db.conn.close()

    def test_upgrade_from_version_3_keeps_messages_and_cursors(self) -> None:
        """A version-3 database with messages is upgraded to 4: the messages
        keep their ids and seqs as sent from device 0 (before devices), with no
        entry in the sender's timeline; the v1 ack cursor becomes base_seq, where
        a device signing in for the first time starts; a new device's cmid 1
        is not taken for the old message with cmid 1."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        for number, sql in schema_scripts()[:3]:
            conn.executescript(sql + f"\nPRAGMA user_version = {number};")
        conn.executescript(
            "INSERT INTO users (id, name, password, created) VALUES (1, 'a', 'x', 0);"
            "INSERT INTO users (id, name, password, created) VALUES (2, 'b', 'x', 0);"
            "INSERT INTO inboxes (uid, max_seq, acked_seq) VALUES (1, 0, 0), (2, 2, 1);"
            "INSERT INTO list_versions (uid) VALUES (1), (2);"
            "INSERT INTO messages (id, sender, cmid, kind, target, seq, body, ts) "
            "VALUES (1, 1, 1, 0, 2, 1, 'old', 5), (2, 1, 2, 0, 2, 2, 'older', 6);"
            "INSERT INTO inbox (uid, seq, msg_id) VALUES (2, 1, 1), (2, 2, 2);"
        )
        conn.commit()
        conn.close()
        os.chmod(path, 0o600)
        db = open_database(path)
        self.assertEqual(schema_version(db), SCHEMA)
        self.assertEqual(
            db.execute("SELECT id, sender, device, cmid, seq, sender_seq, body FROM messages "
                       "ORDER BY id").fetchall(),
            [(1, 1, 0, 1, 1, None, "old"), (2, 1, 0, 2, 2, None, "older")],
        )
        self.assertEqual(
            db.execute("SELECT uid, max_seq, acked_seq, base_seq FROM inboxes ORDER BY uid")
            .fetchall(),
            [(1, 0, 0, 0), (2, 2, 1, 1)],
        )
        self.assertEqual(
            db.execute("SELECT request_list, device_list FROM list_versions").fetchall(),
            [(1, 1), (1, 1)],
        )
        state = sign_in_txn(db, 2, DEV_A, "b's phone", None, sid(1), KEY, "t1", 10, 5, True)
        self.assertEqual((state["acked"], state["last_cmid"], state["inbox_max"]), (1, 0, 2))
        sender = sign_in_txn(db, 1, DEV_A, "a's phone", None, sid(2), KEY, "t2", 10, 5, True)
        self.assertEqual(sender["last_cmid"], 0)
        results, _ = deliver_txn(db, [(1, sender["device"], 1, 2, "new", KIND_USER)], [], 20)
        self.assertEqual(results[0][:2], (STORED, 3))
        db.conn.close()

    def test_file_database_uses_wal(self) -> None:
        """A file database runs in WAL mode and keeps its data across opens."""
        path = self.mktemp()
        db = open_database(path)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        db.execute("INSERT INTO users (name, password, created) VALUES ('a', 'x', 0)")
        db.conn.close()
        again = open_database(path)
        self.assertEqual(again.execute("SELECT name FROM users").fetchall(), [("a",)])
        self.assertEqual(migrate(again), schema_scripts()[-1][0])
        again.conn.close()

    def test_upgrade_from_version_1(self) -> None:
        """A version-1 database with users and groups is upgraded in place:
        the data stays, and rows changed afterwards get versions above every
        version given before (clients compare them)."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        number, sql = schema_scripts()[0]
        self.assertEqual(number, 1)
        conn.executescript(sql + "\nPRAGMA user_version = 1;")
        conn.execute("INSERT INTO users (name, password, created, version) "
                     "VALUES ('a', 'x', 0, 7)")
        conn.execute("INSERT INTO groups (name, owner, created, version) VALUES ('g', 1, 0, 9)")
        conn.commit()
        conn.close()
        os.chmod(path, 0o600)  # the version-2 daemon refuses a file others can read
        db = open_database(path)
        self.assertEqual(schema_version(db), schema_scripts()[-1][0])
        self.assertEqual(db.execute("SELECT name, version FROM users").fetchall(), [("a", 7)])
        uid = add_user_txn(db, "b", "x", 0)
        [(version,)] = db.execute("SELECT version FROM users WHERE id = ?", (uid,)).fetchall()
        self.assertGreater(version, 9)
        db.conn.close()

    def test_opened_by_two_at_once(self) -> None:
        """Two processes (nodes, im58d-admin) opening a new database at the
        same moment both get it at the newest schema: the one that loses the
        race to upgrade finds it done rather than failing."""
        def open_it(path: str, barrier: threading.Barrier, errors: list[BaseException]) -> None:
            barrier.wait()
            try:
                open_database(path).conn.close()
            except BaseException as e:
                errors.append(e)

        for round in range(10):
            path = self.mktemp()
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []
            threads = [
                threading.Thread(target=open_it, args=(path, barrier, errors)) for _ in range(2)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.assertEqual(errors, [], f"round {round}")
            db = open_database(path)
            self.assertEqual(schema_version(db), schema_scripts()[-1][0])
            db.conn.close()

    def test_newer_schema_refused(self) -> None:
        """A database made by a newer im58d is refused with a clear reason."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA user_version = 999")
        conn.close()
        os.chmod(path, 0o600)
        error = self.assertRaises(StoreError, open_database, path)
        self.assertIn("schema version 999", str(error))

    def test_unusable_path(self) -> None:
        """A path that cannot hold a database is a StoreError naming it."""
        path = self.mktemp() + "/missing/dir/im58d.sqlite"
        error = self.assertRaises(StoreError, open_database, path)
        self.assertIn(path, str(error))

    def test_synchronous_setting(self) -> None:
        """The synchronous mode is applied to the connection."""
        db = open_database(self.mktemp(), "full")
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 2)
        db.conn.close()
        self.assertRaises(StoreError, open_database, ":memory:", "off")


class OperationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.store = memory_store(self.reactor)

    def run_op(self, d: Any) -> Any:
        self.reactor.advance(0)
        return self.successResultOf(d)

    def fail_op(self, d: Any, *errors: type[Exception]) -> Any:
        self.reactor.advance(0)
        return self.failureResultOf(d, *errors).value

    def test_users(self) -> None:
        """Users get increasing uids, an inbox and list versions; names are unique."""
        alice = self.run_op(self.store.add_user("alice", "scrypt$h1", 10))
        bob = self.run_op(self.store.add_user("bob", "scrypt$h2", 11))
        self.assertEqual((alice, bob), (1, 2))
        self.fail_op(self.store.add_user("alice", "scrypt$h3", 12), Conflict)
        self.assertEqual(self.run_op(self.store.login_record("alice")), (1, "scrypt$h1", False))
        self.assertIsNone(self.run_op(self.store.login_record("carol")))
        self.assertEqual(self.run_op(self.store.inbox_heads([alice, 99])), {alice: (0, 0)})
        self.assertEqual(self.run_op(self.store.uid_for_name("bob")), bob)

    def test_password_and_disable(self) -> None:
        """Password and disabled flag change by name; unknown names are NotFound."""
        uid = self.run_op(self.store.add_user("alice", "scrypt$old", 0))
        self.assertEqual(self.run_op(self.store.set_password("alice", "scrypt$new")), uid)
        self.assertEqual(self.run_op(self.store.set_disabled("alice", True)), uid)
        self.assertEqual(self.run_op(self.store.login_record("alice")), (uid, "scrypt$new", True))
        self.assertEqual(self.run_op(self.store.disabled_users()), [uid])
        self.assertEqual(
            self.run_op(self.store.list_users()),
            [{"id": uid, "name": "alice", "disabled": True}],
        )
        self.fail_op(self.store.set_password("nobody", "x"), NotFound)
        self.fail_op(self.store.set_disabled("nobody", True), NotFound)

    def versions(self, uid: int) -> tuple[int, int, int]:
        db = self.store._db
        assert db is not None
        row = db.execute(
            "SELECT friend_list, group_list, category_list FROM list_versions WHERE uid = ?",
            (uid,),
        ).fetchone()
        return (row[0], row[1], row[2])

    def test_friends(self) -> None:
        """Friendship is stored both ways and bumps both friend-list versions."""
        a = self.run_op(self.store.add_user("a", "x", 0))
        b = self.run_op(self.store.add_user("b", "x", 0))
        self.run_op(self.store.make_friends(a, b, 5))
        db = self.store._db
        assert db is not None
        rows = db.execute("SELECT uid, friend FROM friends ORDER BY uid").fetchall()
        self.assertEqual(rows, [(a, b), (b, a)])
        self.assertEqual(self.versions(a), (2, 1, 1))
        self.assertEqual(self.versions(b), (2, 1, 1))
        self.fail_op(self.store.make_friends(b, a, 6), Conflict)
        self.fail_op(self.store.make_friends(a, 99, 6), NotFound)
        self.fail_op(self.store.make_friends(a, a, 6), StoreError)
        self.assertEqual(self.versions(a), (2, 1, 1))

    def test_groups(self) -> None:
        """A group holds its owner and members once each and bumps their group lists."""
        a = self.run_op(self.store.add_user("a", "x", 0))
        b = self.run_op(self.store.add_user("b", "x", 0))
        gid = self.run_op(self.store.create_group("team", a, [b, b, a], 5))
        db = self.store._db
        assert db is not None
        members = db.execute("SELECT uid FROM group_members WHERE gid = ? ORDER BY uid", (gid,))
        self.assertEqual([r[0] for r in members], [a, b])
        self.assertEqual(self.versions(a)[1], 2)
        self.assertEqual(self.versions(b)[1], 2)
        self.fail_op(self.store.create_group("x", a, [42], 5), NotFound)
        self.assertEqual(db.execute("SELECT count(*) FROM groups").fetchone()[0], 1)


class GroupCommitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.store = memory_store(self.reactor)

    def test_same_turn_one_transaction(self) -> None:
        """Writes submitted in one reactor turn are committed in one transaction."""
        ds = [self.store.add_user(f"u{i}", "x", 0) for i in range(5)]
        self.assertEqual(self.store.batches, 0)
        self.reactor.advance(0)
        self.assertEqual((self.store.batches, self.store.operations), (1, 5))
        self.assertEqual([self.successResultOf(d) for d in ds], [1, 2, 3, 4, 5])

    def test_failed_operation_does_not_undo_others(self) -> None:
        """One operation failing in a batch leaves the others committed."""
        first = self.store.add_user("a", "x", 0)
        clash = self.store.add_user("a", "y", 0)
        third = self.store.add_user("b", "x", 0)
        self.reactor.advance(0)
        self.assertEqual(self.store.batches, 1)
        self.successResultOf(first)
        self.failureResultOf(clash, Conflict)
        self.successResultOf(third)
        users = self.successResultOf(self._list())
        self.assertEqual([u["name"] for u in users], ["a", "b"])

    def _list(self) -> Any:
        d = self.store.list_users()
        self.reactor.advance(0)
        return d

    def test_partial_writes_of_a_failed_operation_are_undone(self) -> None:
        """An operation that fails after writing leaves nothing behind, alone
        in its transaction or beside others."""

        def write_then_fail(db: Any, name: str) -> None:
            db.execute("INSERT INTO users (name, password, created) VALUES (?, 'x', 0)", (name,))
            raise StoreError("changed my mind")

        alone = self.store._run(write_then_fail, "ghost1")
        self.reactor.advance(0)
        self.failureResultOf(alone, StoreError)
        together = self.store._run(write_then_fail, "ghost2")
        kept = self.store.add_user("kept", "x", 0)
        self.reactor.advance(0)
        self.failureResultOf(together, StoreError)
        self.successResultOf(kept)
        users = self.successResultOf(self._list())
        self.assertEqual([u["name"] for u in users], ["kept"])

    def test_stop_finishes_queued_work(self) -> None:
        """Stopping the store first commits what is queued."""
        d = self.store.add_user("late", "x", 0)
        stopped = self.store.stop()
        self.assertNoResult(stopped)
        self.reactor.advance(0)
        self.assertEqual(self.successResultOf(d), 1)
        self.successResultOf(stopped)
        self.assertIsNone(self.store._db)


class ThreadedStoreTests(TestCase):
    """The store on its real database thread and a file database."""

    @inlineCallbacks
    def test_batches_form_while_the_thread_is_busy(self) -> Any:
        """Work submitted while a transaction runs waits and goes in the next
        one; results come back in submission order."""
        store = SQLiteStore(self.mktemp(), reactor)
        yield store.start()
        try:
            first = [store.add_user(f"a{i}", "x", 0) for i in range(50)]
            uid = yield first[0]
            later = [store.add_user(f"b{i}", "x", 0) for i in range(50)]
            uids = yield gatherResults(first[1:] + later)
            self.assertEqual([uid] + uids, list(range(1, 101)))
            self.assertLess(store.batches, 100)
        finally:
            yield store.stop()


class StoreCase(SynchronousTestCase):
    """A memory store on a clock, with users alice, bob, carol."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.store = memory_store(self.reactor)
        db = self.store._db
        assert db is not None
        self.db = db
        self.alice, self.bob, self.carol = (
            add_user_txn(db, name, "x", 0) for name in ("alice", "bob", "carol")
        )
        self.sessions = 0

    def run_op(self, d: Any) -> Any:
        self.reactor.advance(0)
        return self.successResultOf(d)

    def sign_in(self, uid: int, device: bytes, now: int = 100, online: bool = True,
                max_devices: int = 5, name: str = "phone") -> dict[str, Any]:
        """A new session for the device; its id and token are in the result
        as ``session_id`` and ``token``."""
        self.sessions += 1
        n = self.sessions
        state = self.run_op(self.store.sign_in(
            uid, device, name, "app/2", sid(n), KEY, f"token-{n}", now, max_devices, online))
        state.update(session_id=sid(n), token=f"token-{n}")
        return dict(state)

    def deliver(self, messages: list[Any], acks: tuple[tuple[int, int, int], ...] | list[Any] = (),
                now: int = 500, friends_only: bool = False) -> Any:
        """Store a batch: (results, ack results), see ``deliver_txn``; each
        ack ``(uid, device, seq)`` goes with the device's cursor in the
        store, as the Messenger's copy of it would be."""
        with_cursors = [
            (uid, device, seq, self.db.execute(
                "SELECT acked FROM device_cursors WHERE id = ?", (device,)).fetchone()[0])
            for uid, device, seq in acks
        ]
        return self.run_op(self.store.deliver(messages, with_cursors, now, friends_only))

    def timeline(self, uid: int) -> list[tuple[int, int]]:
        """The user's timeline entries: (seq, msg_id)."""
        return [(int(seq), int(msg_id)) for seq, msg_id in self.db.execute(
            "SELECT seq, msg_id FROM inbox WHERE uid = ? ORDER BY seq", (uid,))]

    def session_ids(self, uid: int) -> set[bytes]:
        return {bytes(row[0]) for row in self.db.execute(
            "SELECT id FROM sessions WHERE uid = ?", (uid,))}

    def device_list_version(self, uid: int) -> int:
        return int(self.db.execute(
            "SELECT device_list FROM list_versions WHERE uid = ?", (uid,)).fetchone()[0])


class TimelineTests(StoreCase):
    def setUp(self) -> None:
        super().setUp()
        self.a1 = self.sign_in(self.alice, DEV_A)["device"]
        self.a2 = self.sign_in(self.alice, DEV_B)["device"]
        self.b1 = self.sign_in(self.bob, DEV_A)["device"]
        self.b2 = self.sign_in(self.bob, DEV_B)["device"]

    def test_one_to_one_entries(self) -> None:
        """A 1:1 message A -> B is stored once with an entry in B's timeline
        and one in A's, each with the next seq of that timeline; the result
        gives the sender's seq and the receiver's entry."""
        self.deliver([(self.bob, self.b1, 1, self.alice, "first", KIND_USER)])
        results, _ = self.deliver([(self.alice, self.a1, 1, self.bob, "hi", KIND_USER)])
        [(status, msg_id, ts, sender_seq, deliveries)] = results
        self.assertEqual((status, msg_id, ts), (STORED, 2, 500))
        self.assertEqual(sender_seq, 2)  # alice's timeline: bob's message, then hers
        self.assertEqual(deliveries, ((self.bob, 2),))
        self.assertEqual(self.timeline(self.alice), [(1, 1), (2, 2)])
        self.assertEqual(self.timeline(self.bob), [(1, 1), (2, 2)])
        self.assertEqual(self.timeline(self.carol), [])
        self.assertEqual(self.run_op(self.store.inbox_heads([self.alice, self.bob])),
                         {self.alice: (2, 0), self.bob: (2, 0)})
        row = self.db.execute(
            "SELECT sender, device, cmid, kind, target, seq, sender_seq, body FROM messages "
            "WHERE id = 2").fetchone()
        self.assertEqual(row, (self.alice, self.a1, 1, KIND_USER, self.bob, 2, 2, "hi"))

    def test_inbox_shows_own_messages_with_to_and_delivered(self) -> None:
        """The sender's timeline shows its own 1:1 message with ``to`` and
        ``delivered`` (False until the receiver acks); the receiver's shows it
        without them."""
        self.deliver([(self.alice, self.a1, 1, self.bob, b"\x00bin", KIND_USER)])
        entries, head = self.run_op(self.store.inbox(self.alice, 0, 10))
        self.assertEqual(head, 1)
        self.assertEqual([e[:8] for e in entries],
                         [(1, 1, self.alice, None, b"\x00bin", 500, self.bob, False)])
        self.assertEqual(entries[0][8], self.a1)  # the sending device, for the server
        entries, _ = self.run_op(self.store.inbox(self.bob, 0, 10))
        self.assertEqual([e[:8] for e in entries],
                         [(1, 1, self.alice, None, b"\x00bin", 500, None, None)])
        self.deliver([], [(self.bob, self.b1, 1)])
        entries, _ = self.run_op(self.store.inbox(self.alice, 0, 10))
        self.assertIs(entries[0][7], True)
        self.assertEqual(self.run_op(self.store.status(self.alice, [1, 7])), [1])

    def test_note_to_oneself_is_one_entry(self) -> None:
        """A message to oneself is one entry in one's own timeline, with no
        other receiver's entry."""
        results, _ = self.deliver([(self.alice, self.a1, 1, self.alice, "note", KIND_USER)])
        self.assertEqual(results, [(STORED, 1, 500, 1, ())])
        self.assertEqual(self.timeline(self.alice), [(1, 1)])
        self.assertEqual(self.run_op(self.store.inbox_heads([self.alice])), {self.alice: (1, 0)})

    def test_group_entries_for_every_member(self) -> None:
        """A group message is stored once with an entry in every member's
        timeline, the sender's included; non-members get none."""
        gid = self.run_op(self.store.create_group("g", self.alice, [self.bob, self.carol], 0))
        self.deliver([(self.bob, self.b1, 1, self.alice, "before", KIND_USER)])
        results, _ = self.deliver([(self.alice, self.a1, 1, gid, "all", KIND_GROUP)])
        [(status, msg_id, _, sender_seq, deliveries)] = results
        self.assertEqual((status, msg_id, sender_seq), (STORED, 2, 2))
        self.assertEqual(sorted(deliveries), sorted([(self.bob, 2), (self.carol, 1)]))
        self.assertEqual(self.timeline(self.alice), [(1, 1), (2, 2)])
        self.assertEqual(self.timeline(self.bob), [(1, 1), (2, 2)])
        self.assertEqual(self.timeline(self.carol), [(1, 2)])
        entries, _ = self.run_op(self.store.inbox(self.carol, 0, 10))
        self.assertEqual(entries[0][:8], (1, 2, self.alice, gid, "all", 500, None, None))
        dave = add_user_txn(self.db, "dave", "x", 0)
        results, _ = self.deliver([(dave, 0, 1, gid, "in?", KIND_GROUP)])
        self.assertEqual(results[0][:2], (REFUSED, 403))
        self.assertEqual(self.timeline(dave), [])

    def test_refused_messages(self) -> None:
        """No such user or group: 404; not a friend (friends-only): 403; nothing
        is stored for them."""
        results, _ = self.deliver([
            (self.alice, self.a1, 1, 99, "x", KIND_USER),
            (self.alice, self.a1, 2, 99, "x", KIND_GROUP),
            (self.alice, self.a1, 3, self.bob, "x", KIND_USER),
        ], friends_only=True)
        self.assertEqual([r[:2] for r in results], [(REFUSED, 404)] * 2 + [(REFUSED, 403)])
        self.assertEqual(self.db.execute("SELECT count(*) FROM messages").fetchone()[0], 0)
        make_friends_txn(self.db, self.alice, self.bob, 0)
        results, _ = self.deliver([(self.alice, self.a1, 3, self.bob, "x", KIND_USER)],
                                  friends_only=True)
        self.assertEqual(results[0][0], STORED)

    def test_dedup_by_sender_device_and_cmid(self) -> None:
        """The same (sender, device, cmid) with the same to, kind and body is
        the stored message again (DUPLICATE, its msg_id and sender seq), in a
        later batch or in the same one; the same cmid from another device of
        the sender is a new message."""
        first, _ = self.deliver([(self.alice, self.a1, 7, self.bob, "hi", KIND_USER)])
        again, _ = self.deliver([(self.alice, self.a1, 7, self.bob, "hi", KIND_USER)])
        self.assertEqual(again, [(DUPLICATE, 1, 1, False)])
        both, _ = self.deliver([
            (self.alice, self.a2, 7, self.bob, "hi", KIND_USER),
            (self.alice, self.a2, 7, self.bob, "hi", KIND_USER),
        ])
        self.assertEqual(both[0][:4], (STORED, 2, 500, 2))
        self.assertEqual(both[1], (DUPLICATE, 2, 2, False))
        self.assertEqual(self.timeline(self.bob), [(1, 1), (2, 2)])
        # bob's cmid 7 is bob's, not alice's
        other, _ = self.deliver([(self.bob, self.b1, 7, self.alice, "hi", KIND_USER)])
        self.assertEqual(other[0][0], STORED)

    def test_cmid_reused_for_another_message(self) -> None:
        """A stored cmid with another to, kind or body is ERROR 409 and nothing
        is stored; in the same batch as its first use too."""
        gid = self.run_op(self.store.create_group("g", self.alice, [self.bob], 0))
        self.deliver([(self.alice, self.a1, 1, self.bob, "hi", KIND_USER)])
        results, _ = self.deliver([
            (self.alice, self.a1, 1, self.bob, "other body", KIND_USER),
            (self.alice, self.a1, 1, self.carol, "hi", KIND_USER),
            (self.alice, self.a1, 1, gid, "hi", KIND_GROUP),
            (self.alice, self.a1, 1, self.bob, b"hi", KIND_USER),  # bin, not str
        ])
        self.assertEqual([r[:2] for r in results], [(REFUSED, 409)] * 4)
        self.assertIn("cmid 1", results[0][2])
        batch, _ = self.deliver([
            (self.alice, self.a1, 2, self.bob, "one", KIND_USER),
            (self.alice, self.a1, 2, self.bob, "two", KIND_USER),
        ])
        self.assertEqual([r[0] for r in batch], [STORED, REFUSED])
        self.assertEqual(batch[1][1], 409)
        self.assertEqual(self.db.execute("SELECT count(*) FROM messages").fetchone()[0], 2)
        self.assertEqual(self.timeline(self.carol), [])

    def test_per_device_cursors(self) -> None:
        """Each device has its own cursor: an ack moves that device's only;
        the cursor never passes the timeline's head; a lower ack leaves it."""
        for cmid in (1, 2, 3):
            self.deliver([(self.alice, self.a1, cmid, self.bob, f"m{cmid}", KIND_USER)])
        _, acks = self.deliver([], [(self.bob, self.b1, 2), (self.bob, self.b2, 1)])
        self.assertEqual([a[0] for a in acks], [2, 1])
        cursors = dict(self.db.execute("SELECT id, acked FROM device_cursors WHERE uid = ?",
                                       (self.bob,)).fetchall())
        self.assertEqual(cursors, {self.b1: 2, self.b2: 1})
        _, acks = self.deliver([], [(self.bob, self.b1, 99), (self.bob, self.b2, 0)])
        self.assertEqual([a[0] for a in acks], [3, 1])  # the head is 3
        self.assertEqual(self.run_op(self.store.inbox_heads([self.bob])), {self.bob: (3, 3)})

    def test_stale_cursor_never_moves_back(self) -> None:
        """The cursor that comes with an ack is the Messenger's copy; a copy
        that fell behind (another node held the device meanwhile) never
        moves the stored cursor back."""
        for cmid in (1, 2, 3):
            self.deliver([(self.alice, self.a1, cmid, self.bob, f"m{cmid}", KIND_USER)])
        self.deliver([], [(self.bob, self.b1, 3)])
        _, acks = self.run_op(self.store.deliver([], [(self.bob, self.b1, 2, 0)], 500))
        self.assertEqual(acks, [(2, ())])
        self.assertEqual(self.db.execute("SELECT acked FROM device_cursors WHERE id = ?",
                                         (self.b1,)).fetchone()[0], 3)

    def test_highest_cursor_drives_ack_n(self) -> None:
        """The user's acked seq is the highest cursor of their devices: the
        first device to pass a received 1:1 entry makes it received, and the
        ack's result names the sender's entry (for ACK_N [seqA]) once; entries
        the user sent and group entries name nothing; a later DUPLICATE says
        the message was received."""
        gid = self.run_op(self.store.create_group("g", self.carol, [self.bob], 0))
        self.deliver([(self.bob, self.b1, 1, self.carol, "mine", KIND_USER)])  # bob: 1
        self.deliver([(self.alice, self.a1, 1, self.bob, "a", KIND_USER)])  # bob 2, alice 1
        self.deliver([(self.carol, 0, 1, gid, "g", KIND_GROUP)])  # bob 3
        self.deliver([(self.alice, self.a1, 2, self.bob, "b", KIND_USER)])  # bob 4, alice 2
        _, acks = self.deliver([], [(self.bob, self.b2, 3)])
        self.assertEqual(acks, [(3, ((self.alice, 1),))])
        _, acks = self.deliver([], [(self.bob, self.b1, 4)])
        self.assertEqual(acks, [(4, ((self.alice, 2),))])
        _, acks = self.deliver([], [(self.bob, self.b2, 4)])  # not the first to get there
        self.assertEqual(acks, [(4, ())])
        self.assertEqual(self.run_op(self.store.inbox_heads([self.bob])), {self.bob: (4, 4)})
        again, _ = self.deliver([(self.alice, self.a1, 2, self.bob, "b", KIND_USER)])
        self.assertEqual(again, [(DUPLICATE, 4, 2, True)])

    def test_note_to_oneself_ack(self) -> None:
        """A note to oneself is received when one of one's devices acks it."""
        self.deliver([(self.alice, self.a1, 1, self.alice, "note", KIND_USER)])
        _, acks = self.deliver([], [(self.alice, self.a2, 1)])
        self.assertEqual(acks, [(1, ((self.alice, 1),))])

    def test_ack_covers_only_what_was_committed_before(self) -> None:
        """An ack in the batch that stores a message cannot cover its entry:
        the device has not seen it."""
        _, acks = self.deliver([(self.alice, self.a1, 1, self.bob, "x", KIND_USER)],
                               [(self.bob, self.b1, 1)])
        self.assertEqual(acks, [(0, ())])
        self.assertEqual(self.run_op(self.store.inbox_heads([self.bob])), {self.bob: (1, 0)})

    def test_last_cmid_per_device(self) -> None:
        """WELCOME's last_cmid: the highest cmid stored from that device (0 for
        a new one), whatever the sender's other devices sent."""
        self.deliver([(self.alice, self.a1, 9, self.bob, "x", KIND_USER),
                      (self.alice, self.a1, 4, self.bob, "y", KIND_USER),
                      (self.alice, self.a2, 2, self.bob, "z", KIND_USER)])
        self.assertEqual(self.sign_in(self.alice, DEV_A)["last_cmid"], 9)
        self.assertEqual(self.sign_in(self.alice, DEV_B)["last_cmid"], 2)
        self.assertEqual(self.sign_in(self.alice, DEV_C)["last_cmid"], 0)
        self.assertEqual(self.sign_in(self.bob, DEV_A)["last_cmid"], 0)


class DeviceSessionTests(StoreCase):
    def test_sign_in_new_device(self) -> None:
        """A first sign-in makes the device (cursor 0, last_cmid 0) and its
        session, online or not as asked; the device list version moves."""
        before = self.device_list_version(self.alice)
        state = self.sign_in(self.alice, DEV_A, now=100)
        self.assertEqual(
            {k: state[k] for k in ("acked", "last_cmid", "replaced", "evicted", "inbox_max")},
            {"acked": 0, "last_cmid": 0, "replaced": None, "evicted": [], "inbox_max": 0},
        )
        self.assertEqual(self.device_list_version(self.alice), before + 1)
        self.assertEqual(state["versions"][4], before + 1)
        record = self.run_op(self.store.session(state["session_id"]))
        self.assertEqual(record, {
            "session_id": state["session_id"], "uid": self.alice, "device": state["device"],
            "device_id": DEV_A, "name": "phone", "client": "app/2", "key": KEY,
            "token": state["token"], "nonce": bytes(8), "acked": 0, "online": True,
            "last_active": 100,
        })
        offline = self.sign_in(self.alice, DEV_B, online=False)
        self.assertFalse(self.run_op(self.store.session(offline["session_id"]))["online"])
        self.assertIsNone(self.run_op(self.store.session(sid(99))))

    def test_new_device_starts_at_base_seq(self) -> None:
        """A new device's cursor starts at the user's base_seq (the v1 cursor of
        a migrated user); a device that signed in before keeps its own."""
        self.db.execute("UPDATE inboxes SET base_seq = 5, max_seq = 8 WHERE uid = ?",
                        (self.alice,))
        first = self.sign_in(self.alice, DEV_A)
        self.assertEqual((first["acked"], first["inbox_max"]), (5, 8))
        self.db.execute("UPDATE devices SET acked = 7 WHERE id = ?", (first["device"],))
        self.assertEqual(self.sign_in(self.alice, DEV_A)["acked"], 7)
        self.assertEqual(self.sign_in(self.alice, DEV_B)["acked"], 5)

    def test_same_device_replaces_its_session(self) -> None:
        """A new sign-in of the same device ends its session (``replaced``):
        one session per device; the device, its cursor and its name stay
        (a new name replaces it)."""
        old = self.sign_in(self.alice, DEV_A, name="phone")
        self.db.execute("UPDATE devices SET acked = 3 WHERE id = ?", (old["device"],))
        new = self.sign_in(self.alice, DEV_A, name="")
        self.assertEqual(new["replaced"], old["session_id"])
        self.assertEqual(new["evicted"], [])
        self.assertEqual((new["device"], new["acked"]), (old["device"], 3))
        self.assertEqual(self.session_ids(self.alice), {new["session_id"]})
        self.assertIsNone(self.run_op(self.store.session(old["session_id"])))
        self.assertIsNone(self.run_op(self.store.session_by_token(old["token"])))
        self.assertEqual(self.run_op(self.store.session(new["session_id"]))["name"], "phone")
        self.sign_in(self.alice, DEV_A, name="tablet")
        self.assertEqual(self.db.execute("SELECT name FROM devices").fetchall(), [("tablet",)])
        # the same device id of another user is another device
        other = self.sign_in(self.bob, DEV_A)
        self.assertIsNone(other["replaced"])
        self.assertNotEqual(other["device"], new["device"])

    def test_eviction_of_the_least_recently_active(self) -> None:
        """Past max_devices a sign-in ends the least recently active sessions
        (``evicted``); a device online now counts as active now, however long
        ago it signed in; other users' sessions are not touched."""
        d1 = self.sign_in(self.alice, DEV_A, now=100, online=True, max_devices=3)
        d2 = self.sign_in(self.alice, DEV_B, now=200, online=False, max_devices=3)
        d3 = self.sign_in(self.alice, DEV_C, now=300, online=False, max_devices=3)
        bob = self.sign_in(self.bob, DEV_A, now=50, online=False)
        d4 = self.sign_in(self.alice, b"device-d-0000004", now=400, online=False,
                          max_devices=3)
        self.assertEqual(d4["evicted"], [d2["session_id"]])
        self.assertEqual(self.session_ids(self.alice),
                         {d1["session_id"], d3["session_id"], d4["session_id"]})
        self.run_op(self.store.set_offline([d1["session_id"]], 500))
        d5 = self.sign_in(self.alice, b"device-e-0000005", now=600, online=True,
                          max_devices=3)
        self.assertEqual(d5["evicted"], [d3["session_id"]])
        d6 = self.sign_in(self.alice, b"device-f-0000006", now=700, online=True,
                          max_devices=1)
        self.assertEqual(set(d6["evicted"]),
                         {d1["session_id"], d4["session_id"], d5["session_id"]})
        self.assertEqual(self.session_ids(self.alice), {d6["session_id"]})
        self.assertEqual(self.session_ids(self.bob), {bob["session_id"]})

    def test_resume_nonce_must_grow(self) -> None:
        """RESUME's nonce is recorded when it is greater than every one
        accepted before, 8 bytes compared as big-endian numbers (0x0100 >
        0x00ff); an equal or smaller one, or the zero nonce of a new session,
        is refused (None) and changes nothing."""
        state = self.sign_in(self.alice, DEV_A, now=100, online=False)
        session = state["session_id"]
        self.assertIsNone(self.run_op(self.store.resume(session, bytes(8), 150)))
        resumed = self.run_op(self.store.resume(session, nonce(0xFF), 200))
        self.assertEqual(
            {k: resumed[k] for k in ("acked", "last_cmid", "inbox_max")},
            {"acked": 0, "last_cmid": 0, "inbox_max": 0},
        )
        record = self.run_op(self.store.session(session))
        self.assertEqual((record["nonce"], record["online"], record["last_active"]),
                         (nonce(0xFF), True, 200))
        for refused in (nonce(0xFF), nonce(0xFE), nonce(1)):
            self.assertIsNone(self.run_op(self.store.resume(session, refused, 300)))
        self.assertIsNotNone(self.run_op(self.store.resume(session, nonce(0x100), 300)))
        self.assertIsNone(self.run_op(self.store.resume(session, nonce(0xFF), 400)))
        self.assertIsNotNone(
            self.run_op(self.store.resume(session, b"\x01" + bytes(7), 400)))
        self.assertEqual(self.run_op(self.store.session(session))["nonce"], b"\x01" + bytes(7))
        self.assertIsNone(self.run_op(self.store.resume(sid(99), nonce(5), 400)))

    def test_resume_refused_for_disabled_accounts(self) -> None:
        """A disabled account's session cannot be resumed, and its token is
        not accepted; the refused nonce is not recorded."""
        state = self.sign_in(self.alice, DEV_A, online=False)
        set_disabled_txn(self.db, "alice", True)
        self.assertIsNone(self.run_op(self.store.resume(state["session_id"], nonce(1), 200)))
        self.assertIsNone(self.run_op(self.store.session_by_token(state["token"])))
        self.assertEqual(self.run_op(self.store.session(state["session_id"]))["nonce"], bytes(8))
        set_disabled_txn(self.db, "alice", False)
        self.assertIsNotNone(self.run_op(self.store.resume(state["session_id"], nonce(1), 200)))
        self.assertEqual(
            self.run_op(self.store.session_by_token(state["token"]))["session_id"],
            state["session_id"])

    def test_set_offline_and_online_sessions(self) -> None:
        """online_sessions lists the records of the sessions whose devices are
        online; set_offline takes devices offline (the session stays) and
        records when they were last active; RESUME makes them online again."""
        a = self.sign_in(self.alice, DEV_A, now=100, online=True)
        b = self.sign_in(self.alice, DEV_B, now=100, online=False)
        c = self.sign_in(self.bob, DEV_A, now=100, online=True)
        online = self.run_op(self.store.online_sessions())
        self.assertEqual({r["session_id"] for r in online}, {a["session_id"], c["session_id"]})
        record = next(r for r in online if r["session_id"] == a["session_id"])
        self.assertEqual((record["uid"], record["device_id"], record["key"], record["token"]),
                         (self.alice, DEV_A, KEY, a["token"]))
        self.run_op(self.store.set_offline([a["session_id"], c["session_id"]], 250))
        self.assertEqual(self.run_op(self.store.online_sessions()), [])
        record = self.run_op(self.store.session(a["session_id"]))
        self.assertEqual((record["online"], record["last_active"]), (False, 250))
        self.run_op(self.store.resume(b["session_id"], nonce(1), 300))
        self.assertEqual([r["session_id"] for r in self.run_op(self.store.online_sessions())],
                         [b["session_id"]])

    def test_online_sessions_leave_out_disabled_accounts(self) -> None:
        """The devices of an account disabled while they were online are not
        among the online sessions (a restart does not bring them back)."""
        a = self.sign_in(self.alice, DEV_A, online=True)
        self.sign_in(self.bob, DEV_A, online=True)
        set_disabled_txn(self.db, "bob", True)
        self.assertEqual([r["session_id"] for r in self.run_op(self.store.online_sessions())],
                         [a["session_id"]])

    def test_sign_out(self) -> None:
        """sign_out ends one of the user's sessions, by device id or by session
        id (``current``): its id; None for no such signed-in device of this
        user.  The device list version moves; the device row stays."""
        a = self.sign_in(self.alice, DEV_A)
        b = self.sign_in(self.alice, DEV_B)
        bob = self.sign_in(self.bob, DEV_C)
        version = self.device_list_version(self.alice)
        self.assertEqual(self.run_op(self.store.sign_out(self.alice, DEV_A, None)),
                         a["session_id"])
        self.assertEqual(self.device_list_version(self.alice), version + 1)
        self.assertIsNone(self.run_op(self.store.sign_out(self.alice, DEV_A, None)))
        self.assertIsNone(self.run_op(self.store.sign_out(self.alice, DEV_C, None)))  # bob's
        self.assertIsNone(self.run_op(self.store.sign_out(self.alice, None, bob["session_id"])))
        self.assertEqual(self.run_op(self.store.sign_out(self.alice, None, b["session_id"])),
                         b["session_id"])
        self.assertEqual(self.session_ids(self.alice), set())
        self.assertEqual(self.session_ids(self.bob), {bob["session_id"]})
        self.assertEqual(self.device_list_version(self.alice), version + 2)
        self.assertEqual(
            self.db.execute("SELECT count(*) FROM devices WHERE uid = ?",
                            (self.alice,)).fetchone()[0], 2)

    def test_stale_and_end_sessions(self) -> None:
        """stale_sessions: every session of a disabled account, and the
        sessions of offline devices last active before the limit (online ones
        never); end_sessions deletes them and names the users whose device
        lists moved."""
        old = self.sign_in(self.alice, DEV_A, now=100, online=False)
        online = self.sign_in(self.alice, DEV_B, now=100, online=True)
        recent = self.sign_in(self.alice, DEV_C, now=900, online=False)
        disabled = self.sign_in(self.carol, DEV_A, now=900, online=True)
        set_disabled_txn(self.db, "carol", True)
        stale = self.run_op(self.store.stale_sessions(500))
        self.assertEqual(sorted(stale), sorted([
            (self.alice, old["session_id"]), (self.carol, disabled["session_id"])]))
        versions = (self.device_list_version(self.alice), self.device_list_version(self.carol))
        moved = self.run_op(self.store.end_sessions([sid for _, sid in stale] + [sid(99)]))
        self.assertEqual(moved, sorted([self.alice, self.carol]))
        self.assertEqual(
            (self.device_list_version(self.alice), self.device_list_version(self.carol)),
            (versions[0] + 1, versions[1] + 1))
        self.assertEqual(self.session_ids(self.alice),
                         {online["session_id"], recent["session_id"]})
        self.assertEqual(self.session_ids(self.carol), set())
        self.assertEqual(self.run_op(self.store.end_sessions([sid(99)])), [])

    def test_devices_listing(self) -> None:
        """devices: the device list version and the user's signed-in devices,
        the online ones first (active now), then the most recently active,
        with id, name, session, online and last seen (the last sign-in,
        RESUME or going offline); signed-out devices are not listed."""
        self.sign_in(self.alice, DEV_A, now=100, online=False, name="old phone")
        b = self.sign_in(self.alice, DEV_B, now=200, online=True, name="tablet")
        c = self.sign_in(self.alice, DEV_C, now=300, online=False, name="pc")
        self.sign_in(self.bob, DEV_A, now=400)
        self.run_op(self.store.sign_out(self.alice, DEV_A, None))
        version, devices = self.run_op(self.store.devices(self.alice))
        self.assertEqual(version, self.device_list_version(self.alice))
        self.assertEqual(devices, [
            {"device_id": DEV_B, "name": "tablet", "session_id": b["session_id"],
             "online": True, "last_seen": 200},
            {"device_id": DEV_C, "name": "pc", "session_id": c["session_id"],
             "online": False, "last_seen": 300},
        ])
        self.assertEqual(self.run_op(self.store.devices(99)), (0, []))


class DatabaseFileTests(SynchronousTestCase):
    """The database holds every session key: it is private to the daemon's user."""

    def test_created_private(self) -> None:
        """A new database file is created with mode 0600, whatever the umask."""
        path = self.mktemp()
        old = os.umask(0)
        try:
            open_database(path).conn.close()
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_readable_by_others_refused(self) -> None:
        """An existing file that group or others may read or write is refused,
        with a message naming ``chmod 600 PATH``; 0600 (and 0700) are fine."""
        path = self.mktemp()
        open_database(path).conn.close()
        for mode in (0o640, 0o604, 0o620, 0o602, 0o666):
            os.chmod(path, mode)
            error = self.assertRaises(StoreError, open_database, path)
            self.assertIn(f"chmod 600 {path}", str(error))
        for mode in (0o600, 0o700):
            os.chmod(path, mode)
            open_database(path).conn.close()

    def test_store_start_refuses_a_readable_file(self) -> None:
        """The store (the daemon) refuses such a file when it starts."""
        path = self.mktemp()
        open_database(path).conn.close()
        os.chmod(path, 0o644)
        store = SQLiteStore(path, MemoryReactorClock(), thread=ImmediateThread())
        failure = self.failureResultOf(store.start(), StoreError)
        self.assertIn("chmod 600", failure.getErrorMessage())
