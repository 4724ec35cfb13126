"""Two real daemons (nodes) on one SQLite database file, without Redis.

Each node has its own ports, its own database connection and its own
database thread; the file is shared, in WAL mode.  Seqs and message ids are
given out inside ``BEGIN IMMEDIATE`` transactions (``deliver_txn``), so they
stay atomic across the processes: every timeline (a receiver's, and a
sender's, which holds what the user sent from each of their devices) is
1..N without a gap or a repeat, whichever node stored each entry.  There is
no routing between nodes here (``[routing] backend = local``): a node
pushes only what it stored itself, and a device finds the rest with a pull
(its own node reads the shared store).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import Logger
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from im58d.client import Client, ClientState, Message
from im58d.logic.passwords import hash_password
from im58d.store.accounts import add_user_txn, make_friends_txn
from im58d.store.sqlite import open_database
from im58d.wire import packets as P

from .e2e import TIMEOUT, Daemon, PacketClient, admin, connect, new_device, until

log = Logger()

NODES = ("a", "b")
# the sending devices, (user, node): s0 has one on each node, and both
# count their cmids from 1 (de-duplication is per device)
SENDERS = (("s0", "a"), ("s1", "a"), ("s0", "b"), ("s2", "b"))
SENDER_NAMES = ("s0", "s1", "s2")
RECEIVERS = ("r0", "r1", "r2")
# MSG_Rs a sender keeps on the wire without their MSG_A: both nodes keep
# committing small batches at the same time, so they contend for the lock
WINDOW = 8
# what in a node's output means a transaction failed or waited too long
TROUBLE = (
    b"database is locked",
    b"database transaction failed",
    b"storing a batch",
    b"Traceback",
    b"Unhandled",
)


def make_users(path: str, names: Sequence[str],
               friends: Iterable[tuple[str, str]] = ()) -> dict[str, int]:
    """Create the database (schema and all), the users (password "pw") and
    their friendships before any node runs: one hash for all of them keeps
    this quick."""
    db = open_database(path)
    try:
        hashed = hash_password("pw")
        now = int(time.time())
        db.conn.execute("BEGIN IMMEDIATE")
        uids = {name: add_user_txn(db, name, hashed, now) for name in names}
        for one, other in friends:
            make_friends_txn(db, uids[one], uids[other], now)
        db.conn.execute("COMMIT")
    finally:
        db.conn.close()
    return uids


def body(name: str, node: str, cmid: int) -> str:
    return f"{name}@{node}:{cmid}"


class Sender(PacketClient):
    """A bare wire client, one device of user ``name``, that once signed in
    sends ``count`` messages to ``receivers`` in turn as fast as the node
    answers: ``window`` MSG_Rs wait for their MSG_A at any time.  It records
    every MSG_A and ACK_N."""

    def __init__(self, name: str, node: str, receivers: Sequence[int], count: int) -> None:
        super().__init__()
        self.name = name
        self.node = node
        self.device_id = new_device()
        self.receivers = list(receivers)
        self.count = count
        self.uid = 0
        self.token = ""
        self.sending = False
        self.next_cmid = 1
        self.answers: dict[int, P.MsgA] = {}  # cmid -> its MSG_A
        self.repeats = 0  # MSG_As for a cmid answered before
        self.acks_n: list[int] = []  # the seqs ACK_N named, in order
        self.changed: list[P.Changed] = []
        self.others: list[Any] = []
        self.done: Deferred[None] = Deferred()

    def __repr__(self) -> str:
        return f"<{self.name} on {self.node}>"

    @inlineCallbacks
    def sign_in(self) -> Any:
        welcome, online = yield self.login(self.name, "pw", self.device_id, f"{self.node}")
        # a new device: nothing sent from it yet, its cursor at the start
        if (welcome.last_cmid, welcome.acked, online) != (0, 0, P.Online(())):
            raise AssertionError(f"{self}: {welcome} {online}")
        self.uid, self.token = welcome.uid, welcome.token

    def go(self) -> Deferred[None]:
        self.sending = True
        for _ in range(WINDOW):
            self._send_next()
        self.done.addTimeout(TIMEOUT, reactor)
        return self.done

    def stop_after(self, at_least: int) -> None:
        """Send no more than what is on the wire and ``at_least`` messages in all."""
        self.count = max(self.next_cmid - 1, at_least)
        if len(self.answers) == self.count and not self.done.called:
            self.done.callback(None)

    def more(self, n: int) -> Deferred[None]:
        """Send ``n`` more messages; fires when they have their MSG_As."""
        self.count += n
        self.done = Deferred()
        return self.go()

    def to(self, cmid: int) -> int:
        return self.receivers[cmid % len(self.receivers)]

    def seqs(self) -> list[int]:
        """The seqs of this device's messages in its user's timeline (MSG_A),
        in cmid order."""
        return [self.answers[cmid].seq for cmid in sorted(self.answers)]

    def _send_next(self) -> None:
        if self.next_cmid <= self.count:
            cmid = self.next_cmid
            self.next_cmid += 1
            self.send(P.MsgR(cmid, self.to(cmid), body(self.name, self.node, cmid)))

    def dataReceived(self, data: bytes) -> None:
        if not self.sending:
            super().dataReceived(data)
            return
        for packet in self.decoder.feed(data):
            if isinstance(packet, P.MsgA):
                if packet.cmid in self.answers:
                    self.repeats += 1
                    continue
                self.answers[packet.cmid] = packet
                self._send_next()
                if len(self.answers) == self.count and not self.done.called:
                    self.done.callback(None)
            elif isinstance(packet, P.AckN):
                self.acks_n.append(packet.seq)
            elif isinstance(packet, P.Changed):
                # the device list moved (the user's other device signed in
                # on the other node): a node's housekeeping tells it
                self.changed.append(packet)
            else:
                self.others.append(packet)
                if isinstance(packet, P.Error) and not self.done.called:
                    self.done.errback(AssertionError(f"{self}: {packet}"))


class TwoNodes(TestCase):
    """Nodes a and b on fresh ports, sharing one database file that has the
    senders and the receivers (password "pw")."""

    timeout = 90

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.database = os.path.join(base, "shared.sqlite")
        self.uids = make_users(self.database, [*SENDER_NAMES, *RECEIVERS])
        self.nodes: dict[str, Daemon] = {}
        for name in NODES:
            node = Daemon(os.path.join(base, name))
            self.addCleanup(node.cleanup)
            self.nodes[name] = node
        yield gatherResults([
            node.start([
                "--database", self.database,
                "--access", "tcp:0:interface=127.0.0.1",
                "--http", "tcp:0:interface=127.0.0.1",
            ])
            for node in self.nodes.values()
        ])
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    def url(self, node: str, path: str) -> str:
        return f"http://127.0.0.1:{self.nodes[node].http_port}{path}"

    @inlineCallbacks
    def senders(self, receivers: Sequence[int], count: int) -> Any:
        senders = []
        for name, node in SENDERS:
            sender = Sender(name, node, receivers, count)
            yield connect_with(self.nodes[node].access_port, sender)
            self.addCleanup(_close, sender)
            # after a failure, the others' waits (and their timeouts) end too
            self.addCleanup(_stop_waiting, sender)
            yield sender.sign_in()
            senders.append(sender)
        return senders

    def db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.database)
        self.addCleanup(db.close)
        return db

    @staticmethod
    def device_keys(db: sqlite3.Connection, senders: Iterable[Sender]) -> dict[int, Sender]:
        """The store's key of each sender's device (``messages.device``)."""
        keys = {}
        for sender in senders:
            (key,) = db.execute("SELECT id FROM devices WHERE uid = ? AND device_id = ?",
                                (sender.uid, sender.device_id)).fetchone()
            keys[key] = sender
        return keys

    @inlineCallbacks
    def get(self, node: str, path: str, token: str) -> Any:
        response = yield self.http.get(self.url(node, path), headers=bearer(token))
        data = yield response.json()
        self.assertEqual(response.code, 200, data)
        return data

    @inlineCallbacks
    def post(self, node: str, path: str, token: str, json: Any) -> Any:
        response = yield self.http.post(self.url(node, path), json=json, headers=bearer(token))
        data = yield response.json()
        self.assertEqual(response.code, 200, data)
        return data

    @inlineCallbacks
    def commit_latency(self, node: str) -> Any:
        """The node's commit latency histogram from /metrics (loopback needs
        no token): ``(count, sum in seconds, bound of the slowest)``."""
        response = yield self.http.get(self.url(node, "/metrics"))
        text = (yield response.text()).splitlines()
        buckets = []
        count = total = 0.0
        for line in text:
            match = re.match(r'im58d_commit_latency_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
            if match:
                buckets.append((float(match[1]), float(match[2])))
            elif line.startswith("im58d_commit_latency_seconds_count "):
                count = float(line.split()[1])
            elif line.startswith("im58d_commit_latency_seconds_sum "):
                total = float(line.split()[1])
        slowest = next(le for le, n in buckets if n >= count)
        return int(count), total, slowest

    @inlineCallbacks
    def stop_nodes(self) -> Any:
        """Stop both nodes (SIGTERM): each ends cleanly and its output shows no
        failed transaction and no "database is locked"."""
        for node in self.nodes.values():
            ended = yield node.stop()
            self.assertTrue(ended.clean, (ended, node.output.decode()))
        for name, node in self.nodes.items():
            for trouble in TROUBLE:
                self.assertNotIn(trouble, node.output, f"node {name}:\n{node.output.decode()}")


def bearer(token: str) -> dict[bytes | str, bytes | str]:
    return {"Authorization": f"Bearer {token}"}


def connect_with(port: int, protocol: PacketClient) -> Deferred[PacketClient]:
    d: Deferred[PacketClient] = connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol
    )
    return d


def _stop_waiting(sender: Sender) -> None:
    if not sender.done.called:
        sender.done.cancel()


def _close(client: PacketClient) -> Deferred[None]:
    if client.lost.called:
        return client.lost
    client.transport.loseConnection()  # type: ignore[union-attr]
    return client.lost


def switches(labels: Sequence[str]) -> int:
    """How often the sequence changes from one label to another."""
    return sum(1 for x, y in zip(labels, labels[1:], strict=False) if x != y)


class SeqAllocationTests(TwoNodes):
    @inlineCallbacks
    def test_concurrent_senders_on_both_nodes(self) -> Any:
        """Two sending devices on node a and two on node b (s0 has one on
        each, both counting cmids from 1) send messages as fast as the nodes
        answer (200 each at least) to the same three receivers, and go on
        until im58d-admin, run meanwhile, has added a user.  Every message is
        stored once (the same cmid from s0's two devices is two messages):
        every device has a MSG_A with a distinct msg_id for each message and
        no ERROR; each receiver's timeline is 1..N with each of its messages
        once; each sender's timeline is 1..N too, holding exactly what the
        user's devices sent, at the seqs their MSG_As named (s0's from both
        nodes, interleaved); both nodes let the new user sign in a new
        device; neither node logged a failed transaction or a locked
        database."""
        per_sender = 200
        receivers = [self.uids[name] for name in RECEIVERS]
        # senders go on until im58d-admin has written, and 200 messages at least
        senders = yield self.senders(receivers, 100 * per_sender)
        started = reactor.seconds()
        load = gatherResults([sender.go() for sender in senders], consumeErrors=True)
        # im58d-admin writes to the same file while both nodes store messages
        out, err, code = yield admin(self.database, "user", "add", "late", "--password", "pw")
        admin_done = reactor.seconds() - started
        self.assertEqual(code, 0, err)
        if load.called:
            yield load  # a sender's failure
        self.assertFalse(load.called, "the load ended before im58d-admin did")
        for sender in senders:
            sender.stop_after(per_sender)
        yield load
        elapsed = reactor.seconds() - started
        late = int(out)
        self.assertNotIn(late, self.uids.values())
        # both nodes see the new user at once: a device of it signs in on each
        for node in NODES:
            client = yield connect(self.nodes[node].access_port)
            self.addCleanup(_close, client)
            welcome, online = yield client.login("late", "pw")
            self.assertEqual((welcome.uid, welcome.inbox_max, welcome.last_cmid, welcome.acked,
                              online), (late, 0, 0, 0, P.Online(())), node)

        # every device: one MSG_A per message, no repeat, no error
        msg_ids: dict[tuple[bytes, int], int] = {}
        for sender in senders:
            self.assertGreaterEqual(sender.count, per_sender)
            self.assertEqual(sorted(sender.answers), list(range(1, sender.count + 1)), sender)
            self.assertEqual((sender.repeats, sender.others, sender.acks_n), (0, [], []),
                             sender)
            for cmid, msg_a in sender.answers.items():
                msg_ids[(sender.device_id, cmid)] = msg_a.msg_id
            # one connection, in cmid order: its entries in the timeline too
            seqs = sender.seqs()
            self.assertEqual(seqs, sorted(seqs), sender)
        total = sum(sender.count for sender in senders)
        self.assertEqual(len(set(msg_ids.values())), total)

        db = self.db()
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        self.assertEqual(db.execute("SELECT count(*) FROM messages").fetchone()[0], total)
        # an entry in the receiver's timeline and one in the sender's
        self.assertEqual(db.execute("SELECT count(*) FROM inbox").fetchone()[0], 2 * total)
        device_of = self.device_keys(db, senders)
        mixed = {}
        for receiver in receivers:
            expected = {
                (sender.device_id, cmid) for sender in senders for cmid in sender.answers
                if sender.to(cmid) == receiver
            }
            n = len(expected)
            rows = db.execute(
                "SELECT i.seq, i.msg_id, m.sender, m.device, m.cmid, m.kind, m.target, m.seq, "
                "m.body FROM inbox i JOIN messages m ON m.id = i.msg_id "
                "WHERE i.uid = ? ORDER BY i.seq",
                (receiver,),
            ).fetchall()
            self.assertEqual([row[0] for row in rows], list(range(1, n + 1)), receiver)
            self.assertEqual({(device_of[row[3]].device_id, row[4]) for row in rows}, expected,
                             receiver)
            self.assertEqual(len({row[1] for row in rows}), n, receiver)
            for seq, msg_id, sender_uid, device, cmid, kind, target, message_seq, text in rows:
                sender = device_of[device]
                self.assertEqual((sender_uid, kind, target, message_seq),
                                 (sender.uid, 0, receiver, seq))
                self.assertEqual(msg_id, msg_ids[(sender.device_id, cmid)])
                self.assertEqual(text, body(sender.name, sender.node, cmid))
            head = db.execute(
                "SELECT max_seq, acked_seq FROM inboxes WHERE uid = ?", (receiver,)
            ).fetchone()
            self.assertEqual(head, (n, 0), receiver)
            mixed[receiver] = switches([device_of[row[3]].node for row in rows])
        for name in SENDER_NAMES:
            uid = self.uids[name]
            devices = [s for s in senders if s.name == name]
            n = sum(s.count for s in devices)
            rows = db.execute(
                "SELECT i.seq, i.msg_id, m.sender, m.device, m.cmid, m.sender_seq "
                "FROM inbox i JOIN messages m ON m.id = i.msg_id "
                "WHERE i.uid = ? ORDER BY i.seq",
                (uid,),
            ).fetchall()
            self.assertEqual([row[0] for row in rows], list(range(1, n + 1)), name)
            for seq, msg_id, sender_uid, device, cmid, sender_seq in rows:
                sender = device_of[device]
                self.assertEqual((sender_uid, sender.name, sender_seq), (uid, name, seq))
                self.assertEqual(sender.answers[cmid].msg_id, msg_id)
                self.assertEqual(sender.answers[cmid].seq, seq)
            head = db.execute(
                "SELECT max_seq, acked_seq FROM inboxes WHERE uid = ?", (uid,)
            ).fetchone()
            self.assertEqual(head, (n, 0), name)
            if len(devices) > 1:
                mixed[uid] = switches([device_of[row[3]].node for row in rows])
        # the nodes really stored at the same time: each timeline has runs
        # of entries from both, interleaved (s0's own timeline too)
        self.assertTrue(all(mixed.values()), mixed)
        latency = {}
        for node in NODES:
            latency[node] = yield self.commit_latency(node)
        yield self.stop_nodes()
        log.info(
            "shared store: {total} messages in {elapsed:.2f}s; im58d-admin done after "
            "{admin:.2f}s; node switches per timeline: {mixed}; commits (count, sum s, "
            "slowest <= s): {latency}",
            total=total, elapsed=elapsed, admin=admin_done, mixed=mixed, latency=latency,
        )


class CrossNodeDeliveryTests(TwoNodes):
    @inlineCallbacks
    def test_receiver_on_one_node_sender_on_both(self) -> Any:
        """A receiver's device is signed in on node a and acks what it gets,
        while the sending devices on a and on b send to it.  Node a pushes
        what it stored (and the receiver pulls the gaps b left); b pushes
        nothing, since there is no routing between nodes here.  Afterwards a
        pull over HTTP returns every message once, seqs 1..N, with no ``to``
        and no ``delivered`` (they are received, not sent), the same from
        either node (the bearer token works on both); the receiver showed
        each once, in seq order; its cursor is what it showed.  Senders
        learn delivery: the devices on node a by ACK_N naming their own seqs
        (s0's device there for the messages of s0's device on b too, as
        they are entries of the same timeline), the devices on b by nothing
        (no routing) but POST /v1/status on either node (the shared
        store)."""
        per_sender = 100
        shown: list[Message] = []
        receiver = Client(
            reactor, "127.0.0.1", self.nodes["a"].access_port, self.url("a", ""),
            "r0", "pw", device="shared-store", state=ClientState(next_cmid=1),
            on_message=shown.append, http=self.http,
        )
        self.addCleanup(receiver.stop)
        yield receiver.start()
        uid = self.uids["r0"]
        senders = yield self.senders([uid], per_sender)
        yield gatherResults([sender.go() for sender in senders], consumeErrors=True)
        total = len(SENDERS) * per_sender
        db = self.db()
        device_of = self.device_keys(db, senders)

        def stored_by(node: str) -> list[int]:
            keys = [key for key, s in device_of.items() if s.node == node]
            marks = ",".join("?" * len(keys))
            return [row[0] for row in db.execute(
                f"SELECT seq FROM messages WHERE target = ? AND device IN ({marks})",
                (uid, *keys),
            )]

        def acked() -> tuple[int, int]:
            """The user's cursor (the highest of its devices') and the device's."""
            head = db.execute("SELECT acked_seq FROM inboxes WHERE uid = ?", (uid,)).fetchone()
            cursor = db.execute("SELECT acked FROM device_cursors WHERE uid = ? AND device_id = ?",
                                (uid, receiver.state.device_id)).fetchone()
            return int(head[0]), int(cursor[0])

        by_a, by_b = stored_by("a"), stored_by("b")
        self.assertEqual(sorted(by_a + by_b), list(range(1, total + 1)))
        # a pushed what it stored, in seq order on one connection; gaps (what
        # b stored) made the receiver pull from a.  Once the last push is in
        # and no pull runs, nothing changes until the next push.
        top = max(by_a)
        yield ensureDeferred(until(
            lambda: ((receiver.state.last_seq or 0) >= top or top in receiver._ahead)
            and not receiver._pulling,
            what="the last message a stored",
        ))
        before = (receiver.state.last_seq, sorted(receiver._ahead))
        # one more message from a sender on a: its push shows any gap below
        # it, so the receiver pulls (from a) what it lacks and acks it all
        yield senders[0].more(1)
        total += 1
        yield ensureDeferred(until(
            lambda: receiver.state.last_seq == total and acked() == (total, total),
            what="the receiver showing and acking everything",
        ))
        self.assertEqual(receiver._ahead, {})

        # the pull: everything, whichever node stored it, from either node
        pulls: dict[str, list[dict[str, Any]]] = {}
        for node in NODES:
            pulled = pulls[node] = []
            while True:
                page = yield self.get(node, f"/v1/inbox?after={len(pulled)}&limit=500",
                                      receiver.token or "")
                self.assertEqual(page["max"], total)
                if not page["messages"]:
                    break
                pulled += page["messages"]
        pulled = pulls["a"]
        self.assertEqual(pulls["b"], pulled)
        self.assertEqual([m["seq"] for m in pulled], list(range(1, total + 1)))
        self.assertEqual(
            sorted((m["from"], m["body"]) for m in pulled),
            sorted((s.uid, body(s.name, s.node, cmid)) for s in senders for cmid in s.answers),
        )
        self.assertEqual(
            {m["msg_id"] for m in pulled},
            {a.msg_id for s in senders for a in s.answers.values()},
        )
        self.assertEqual(len({m["msg_id"] for m in pulled}), total)
        self.assertEqual([m for m in pulled if "to" in m or "delivered" in m or "group" in m],
                         [])
        # the receiver showed each message once, in seq order
        self.assertEqual(
            [(m.seq, m.msg_id, m.sender, m.body, m.to, m.group) for m in shown],
            [(m["seq"], m["msg_id"], m["from"], m["body"], None, None) for m in pulled],
        )

        # delivery, as each sender's own node sees it: ACK_N from a (where
        # the acks were made) to the devices there of each sender, naming
        # the entries of the sender's timeline; POST /v1/status on either
        # node (the store)
        for name in SENDER_NAMES:
            devices = [s for s in senders if s.name == name]
            seqs = sorted(seq for s in devices for seq in s.seqs())
            for sender in devices:
                if sender.node == "a":
                    yield ensureDeferred(until(
                        lambda s=sender, n=seqs: len(s.acks_n) >= len(n),
                        what=f"ACK_Ns for {sender}"))
                    self.assertEqual(sorted(sender.acks_n), seqs, sender)
                else:
                    self.assertEqual(sender.acks_n, [], sender)
            for sender in devices:
                mine = sorted(a.msg_id for a in sender.answers.values())
                for node in NODES:
                    status = yield self.post(node, "/v1/status", sender.token,
                                             {"msg_ids": mine})
                    self.assertEqual(status["delivered"], mine, (sender, node))
        for sender in senders:
            self.assertEqual((sender.repeats, sender.others), (0, []), sender)
        yield receiver.stop()
        yield self.stop_nodes()
        log.info(
            "cross-node delivery: {total} messages, {a} stored by a, {b} by b; before "
            "the last push the receiver had shown {before[0]} (ahead: {before[1]})",
            total=total, a=len(by_a) + 1, b=len(by_b), before=before,
        )
