"""The SQLite store: schema and migrations, group commit, the operations."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from im58d.store.accounts import add_user_txn
from im58d.store.interfaces import Conflict, NotFound, StoreError
from im58d.store.sqlite import (
    SQLiteStore,
    migrate,
    open_database,
    schema_scripts,
    schema_version,
)

from .support import memory_store

TABLES = {
    "users", "messages", "inboxes", "inbox", "list_versions", "categories", "friends",
    "friend_requests", "groups", "group_members", "report_counts", "report_users",
    "report_batches",
}


class SchemaTests(SynchronousTestCase):
    def test_new_database(self) -> None:
        """A new database gets every table and the newest schema version."""
        db = open_database(":memory:")
        self.assertTrue(TABLES <= set(db.table_names()))
        self.assertEqual(schema_version(db), schema_scripts()[-1][0])

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
        self.assertEqual(self.run_op(self.store.inbox_max(alice)), 0)
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
