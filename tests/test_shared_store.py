"""Two real daemons (nodes) on one SQLite database file.

Each node has its own ports, its own database connection and its own
database thread; the file is shared, in WAL mode.  Seqs and message ids are
given out inside ``BEGIN IMMEDIATE`` transactions (``deliver_txn``), so they
stay atomic across the processes: every receiver's inbox is 1..N without a
gap or a repeat, whichever node stored each message.  There is no routing
between nodes yet: a node pushes only what it stored itself, and a receiver
finds the rest with a pull (its own node reads the shared store).
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

from .e2e import TIMEOUT, Daemon, PacketClient, admin, connect, until

log = Logger()

NODES = ("a", "b")
# which node each sender logs in on
SENDERS = {"s0": "a", "s1": "a", "s2": "b", "s3": "b"}
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


def body(name: str, cmid: int) -> str:
    return f"{name}:{cmid}"


class Sender(PacketClient):
    """A bare wire client that, once logged in, sends ``count`` messages to
    ``receivers`` in turn as fast as the node answers: ``window`` MSG_Rs wait
    for their MSG_A at any time.  It records every MSG_A and ACK_N."""

    def __init__(self, name: str, node: str, receivers: Sequence[int], count: int) -> None:
        super().__init__()
        self.name = name
        self.node = node
        self.receivers = list(receivers)
        self.count = count
        self.uid = 0
        self.token = ""
        self.sending = False
        self.next_cmid = 1
        self.answers: dict[int, P.MsgA] = {}  # cmid -> its MSG_A
        self.repeats = 0  # MSG_As for a cmid answered before
        self.acks_n: dict[int, int] = {}  # msg_id -> cmid
        self.others: list[Any] = []
        self.done: Deferred[None] = Deferred()

    @inlineCallbacks
    def login(self) -> Any:
        self.send(P.Login(self.name, "pw", "shared-store"))
        welcome = yield self.next()
        if not isinstance(welcome, P.Welcome):
            raise AssertionError(f"{self.name}: {welcome}")
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

    def _send_next(self) -> None:
        if self.next_cmid <= self.count:
            cmid = self.next_cmid
            self.next_cmid += 1
            self.send(P.MsgR(cmid, self.to(cmid), body(self.name, cmid)))

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
                self.acks_n[packet.msg_id] = packet.cmid
            else:
                self.others.append(packet)
                if isinstance(packet, P.Error) and not self.done.called:
                    self.done.errback(AssertionError(f"{self.name} on {self.node}: {packet}"))


class TwoNodes(TestCase):
    """Nodes a and b on fresh ports, sharing one database file that has the
    senders and the receivers (password "pw")."""

    timeout = 90

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.database = os.path.join(base, "shared.sqlite")
        self.uids = make_users(self.database, [*SENDERS, *RECEIVERS])
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
        for name, node in SENDERS.items():
            sender = Sender(name, node, receivers, count)
            yield connect_with(self.nodes[node].access_port, sender)
            self.addCleanup(_close, sender)
            # after a failure, the others' waits (and their timeouts) end too
            self.addCleanup(_stop_waiting, sender)
            yield sender.login()
            senders.append(sender)
        return senders

    def db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.database)
        self.addCleanup(db.close)
        return db

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


class SeqAllocationTests(TwoNodes):
    @inlineCallbacks
    def test_concurrent_senders_on_both_nodes(self) -> Any:
        """Two senders on node a and two on node b send messages as fast as the
        nodes answer (200 each at least) to the same three receivers, and go
        on until im58d-admin, run meanwhile, has added a user: every message
        is in its receiver's inbox exactly once, the seqs are 1..N (N =
        inboxes.max_seq), every sender has a MSG_A with a distinct msg_id for
        each message, both nodes let the new user log in, and neither node
        logged a failed transaction or a locked database."""
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
        # both nodes see the new user at once: it logs in on each
        for node in NODES:
            client = yield connect(self.nodes[node].access_port)
            self.addCleanup(_close, client)
            client.send(P.Login("late", "pw", node))
            welcome = yield client.next()
            self.assertIsInstance(welcome, P.Welcome, node)
            self.assertEqual((welcome.uid, welcome.inbox_max), (late, 0), node)

        # every sender: one MSG_A per message, no repeat, no error
        msg_ids: dict[tuple[int, int], int] = {}
        for sender in senders:
            self.assertGreaterEqual(sender.count, per_sender)
            self.assertEqual(sorted(sender.answers), list(range(1, sender.count + 1)), sender.name)
            self.assertEqual((sender.repeats, sender.others), (0, []), sender.name)
            for cmid, msg_a in sender.answers.items():
                msg_ids[(sender.uid, cmid)] = msg_a.msg_id
        total = sum(sender.count for sender in senders)
        self.assertEqual(len(set(msg_ids.values())), total)

        db = self.db()
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        self.assertEqual(db.execute("SELECT count(*) FROM messages").fetchone()[0], total)
        self.assertEqual(db.execute("SELECT count(*) FROM inbox").fetchone()[0], total)
        node_of = {self.uids[name]: node for name, node in SENDERS.items()}
        name_of = {uid: name for name, uid in self.uids.items()}
        switches = {}
        for receiver in receivers:
            expected = {
                (sender.uid, cmid) for sender in senders for cmid in sender.answers
                if sender.to(cmid) == receiver
            }
            n = len(expected)
            rows = db.execute(
                "SELECT i.seq, i.msg_id, m.sender, m.cmid, m.kind, m.target, m.seq, m.body "
                "FROM inbox i JOIN messages m ON m.id = i.msg_id "
                "WHERE i.uid = ? ORDER BY i.seq",
                (receiver,),
            ).fetchall()
            self.assertEqual([row[0] for row in rows], list(range(1, n + 1)), receiver)
            self.assertEqual({(row[2], row[3]) for row in rows}, expected, receiver)
            self.assertEqual(len({row[1] for row in rows}), n, receiver)
            for seq, msg_id, sender_uid, cmid, kind, target, message_seq, text in rows:
                self.assertEqual((kind, target, message_seq), (0, receiver, seq))
                self.assertEqual(msg_id, msg_ids[(sender_uid, cmid)])
                self.assertEqual(text, body(name_of[sender_uid], cmid))
            head = db.execute(
                "SELECT max_seq, acked_seq FROM inboxes WHERE uid = ?", (receiver,)
            ).fetchone()
            self.assertEqual(head, (n, 0), receiver)
            nodes_in_order = [node_of[row[2]] for row in rows]
            switches[receiver] = sum(
                1 for x, y in zip(nodes_in_order, nodes_in_order[1:], strict=False) if x != y
            )
        # the nodes really stored at the same time: each inbox has runs of
        # messages from both, interleaved
        self.assertTrue(all(switches.values()), switches)
        latency = {}
        for node in NODES:
            latency[node] = yield self.commit_latency(node)
        yield self.stop_nodes()
        log.info(
            "shared store: {total} messages in {elapsed:.2f}s; im58d-admin done after "
            "{admin:.2f}s; node switches per inbox: {switches}; commits (count, sum s, "
            "slowest <= s): {latency}",
            total=total, elapsed=elapsed, admin=admin_done, switches=switches,
            latency=latency,
        )


class CrossNodeDeliveryTests(TwoNodes):
    @inlineCallbacks
    def test_receiver_on_one_node_sender_on_both(self) -> Any:
        """A receiver is logged in on node a and acks what it gets, while
        senders on a and on b send to it.  Node a pushes what it stored (and
        the receiver pulls the gaps b left); b pushes nothing, since routing
        between nodes does not exist yet.  Afterwards a pull over HTTP from a
        returns every message once, seqs 1..N; the ack cursor is what the
        receiver showed; senders learn delivery (ACK_N on a, /v1/status on
        b, from the shared store)."""
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

        def stored_by(node: str) -> list[int]:
            uids = [s.uid for s in senders if s.node == node]
            marks = ",".join("?" * len(uids))
            return [row[0] for row in db.execute(
                f"SELECT seq FROM messages WHERE target = ? AND sender IN ({marks})",
                (uid, *uids),
            )]

        def acked() -> int:
            return int(db.execute(
                "SELECT acked_seq FROM inboxes WHERE uid = ?", (uid,)).fetchone()[0])

        by_a, by_b = stored_by("a"), stored_by("b")
        self.assertEqual(sorted(by_a + by_b), list(range(1, total + 1)))
        # a pushed what it stored, in seq order on one connection; gaps (what
        # b stored) made the receiver pull from a.  Once the last push is in
        # and no pull runs, nothing changes until the next push.
        top = max(by_a)
        yield ensureDeferred(until(
            lambda: (receiver.state.last_seq >= top or top in receiver._ahead)
            and not receiver._pulling,
            what="the last message a stored",
        ))
        before = (receiver.state.last_seq, sorted(receiver._ahead))
        # one more message from a sender on a: its push shows any gap below
        # it, so the receiver pulls (from a) what it lacks and acks it all
        yield senders[0].more(1)
        total += 1
        yield ensureDeferred(until(
            lambda: receiver.state.last_seq == total and acked() == total,
            what="the receiver showing and acking everything",
        ))
        self.assertEqual(receiver._ahead, {})

        # the pull from a: everything, whichever node stored it
        pulled: list[dict[str, Any]] = []
        while True:
            page = yield self.get("a", f"/v1/inbox?after={len(pulled)}&limit=500",
                                  receiver.token or "")
            self.assertEqual(page["max"], total)
            if not page["messages"]:
                break
            pulled += page["messages"]
        self.assertEqual([m["seq"] for m in pulled], list(range(1, total + 1)))
        self.assertEqual(
            sorted((m["from"], m["body"]) for m in pulled),
            sorted((s.uid, body(s.name, cmid)) for s in senders for cmid in s.answers),
        )
        self.assertEqual(
            {m["msg_id"] for m in pulled},
            {a.msg_id for s in senders for a in s.answers.values()},
        )
        self.assertEqual(len({m["msg_id"] for m in pulled}), total)
        # the receiver showed each message once, in seq order
        self.assertEqual(
            [(m.seq, m.msg_id, m.sender, m.body) for m in shown],
            [(m["seq"], m["msg_id"], m["from"], m["body"]) for m in pulled],
        )

        # delivery, as each sender's own node sees it: ACK_N from a (where
        # the ack was made), POST /v1/status on either node (the store)
        for sender in senders:
            mine = sorted(a.msg_id for a in sender.answers.values())
            if sender.node == "a":
                yield ensureDeferred(until(lambda s=sender: len(s.acks_n) == s.count,
                                           what=f"ACK_Ns for {sender.name}"))
                self.assertEqual(sorted(sender.acks_n), mine, sender.name)
                self.assertEqual(
                    sender.acks_n, {a.msg_id: a.cmid for a in sender.answers.values()}
                )
            status = yield self.post(sender.node, "/v1/status", sender.token,
                                     {"msg_ids": mine})
            self.assertEqual(status["delivered"], mine, sender.name)
        yield receiver.stop()
        yield self.stop_nodes()
        log.info(
            "cross-node delivery: {total} messages, {a} stored by a, {b} by b; before "
            "the last push the receiver had shown {before[0]} (ahead: {before[1]})",
            total=total, a=len(by_a) + 1, b=len(by_b), before=before,
        )
