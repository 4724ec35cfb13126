"""The logic layer across nodes: sessions, messages and presence when a
user's session is on another node.

Two nodes (two Harnesses) share one in-memory store and one clock; their
routers share ``Registry``, an in-memory stand-in for Redis with the
semantics of the Lua scripts of ``im58d.routing.redis`` (the real router is
pinned against a real redis-server in test_redis_router.py).  What one node
publishes reaches the other on the next reactor turn, as over pub/sub.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from im58d.routing.local import LocalRouter
from im58d.store.accounts import make_friends_txn
from im58d.tap import join_cluster
from im58d.wire import packets as P

from .support import Harness, add_user
from .test_sessions import resume_for


class Registry:
    """What Redis holds for the nodes: uid -> (node, sid), the records."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.users: dict[int, tuple[str, bytes]] = {}
        self.records: dict[bytes, dict[str, Any]] = {}
        self.nonces: set[tuple[bytes, bytes]] = set()
        self.routers: dict[str, ClusterRouter] = {}
        self.lose_publications = False
        # publications held back (a slow Redis): delivered by deliver_held()
        self.held: list[tuple[str, str, tuple[Any, ...]]] | None = None

    def publish(self, node: str, handler: str, *args: Any) -> None:
        if self.lose_publications:
            return
        if self.held is not None:
            self.held.append((node, handler, args))
            return
        router = self.routers[node]
        self.clock.callLater(0, lambda: getattr(router, handler)(*args))

    def deliver_held(self) -> None:
        held, self.held = self.held or [], None
        for node, handler, args in held:
            self.publish(node, handler, *args)


class ClusterRouter(LocalRouter):
    clustered = True

    def __init__(self, registry: Registry, node: str) -> None:
        super().__init__()
        self.registry = registry
        self.node = node
        registry.routers[node] = self

    def register(self, session: Any) -> Deferred[bool]:
        reg = self.registry
        old = reg.users.get(session.uid)
        if old is not None:
            reg.records.pop(old[1], None)
            if old[0] != self.node:
                reg.publish(old[0], "on_gone", old[1], None, True)
        reg.records[session.session_id] = {
            "uid": session.uid, "key": session.session_key, "token": session.token,
            "device": session.device, "client": session.client,
            "started": session.started, "gen": 0, "node": self.node,
        }
        reg.users[session.uid] = (self.node, session.session_id)
        return succeed(old is not None)

    def fetch(self, session_id: bytes) -> Deferred[dict[str, Any] | None]:
        record = self.registry.records.get(session_id)
        return succeed(None if record is None else dict(record))

    def take(self, session: Any) -> Deferred[bool]:
        reg = self.registry
        current = reg.users.get(session.uid)
        if current is None or current[1] != session.session_id:
            return succeed(False)
        record = reg.records[session.session_id]
        record["node"] = self.node
        record["gen"] += 1
        session.gen = record["gen"]
        reg.users[session.uid] = (self.node, session.session_id)
        if current[0] != self.node:
            reg.publish(current[0], "on_gone", session.session_id, session.gen, False)
        return succeed(True)

    def use_nonce(self, session_id: bytes, nonce: bytes) -> Deferred[bool]:
        fresh = (session_id, nonce) not in self.registry.nonces
        self.registry.nonces.add((session_id, nonce))
        return succeed(fresh)

    def release(self, session: Any, was_current: bool, connected: bool = False) -> Deferred[bool]:
        reg = self.registry
        mine = reg.users.get(session.uid) == (self.node, session.session_id)
        if mine:
            del reg.users[session.uid]
        record = reg.records.get(session.session_id)
        if record is not None and record["node"] == self.node:
            del reg.records[session.session_id]
        return succeed(mine and was_current)

    def token_uid(self, token: str) -> Deferred[int | None]:
        for record in self.registry.records.values():
            if record["token"] == token:
                return succeed(record["uid"])
        return succeed(None)

    def forward(self, packets: list[tuple[int, int, bytes]]) -> None:
        self._route("on_packets", packets, lambda item: item[0])

    def forward_lists(self, uids: list[int]) -> None:
        self._route("on_lists", uids, lambda uid: uid)

    def _route(self, handler: str, items: list[Any], uid_of: Any) -> None:
        by_node: dict[str, list[Any]] = {}
        for item in items:
            where = self.registry.users.get(uid_of(item))
            if where is not None and where[0] != self.node:
                by_node.setdefault(where[0], []).append(item)
        for node, some in by_node.items():
            self.registry.publish(node, handler, some)


class TwoNodes(SynchronousTestCase):
    def setUp(self) -> None:
        self.a = Harness()
        self.registry = Registry(self.a.reactor)
        self.a = self.node("a")
        self.b = self.node("b")
        self.uids = {name: add_user(self.a.store, name) for name in ("alice", "bob", "carol")}
        db = self.a.store._db
        assert db is not None
        make_friends_txn(db, self.uids["alice"], self.uids["bob"], 0)

    def node(self, name: str) -> Harness:
        """A node on the first harness's clock and store, with a router of
        the registry."""
        harness = Harness(reactor=self.a.reactor, store=self.a.store,
                          router=ClusterRouter(self.registry, name))
        join_cluster(harness.router, harness.sessions, harness.presence, harness.messenger)
        return harness

    def turn(self) -> None:
        self.a.turn()


class FriendsOnTwoNodes(TwoNodes):
    """alice logged in on node a, her friend bob on node b."""

    def setUp(self) -> None:
        super().setUp()
        self.alice = self.a.connect()
        self.alice.login("alice")
        self.bob = self.b.connect()
        self.bob_welcome = self.bob.login("bob")
        self.turn()
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], True)])


class MessagesAcrossNodes(FriendsOnTwoNodes):
    def test_six_packets_across_nodes(self) -> None:
        """alice on node a, bob on node b: MSG_A to alice, MSG_N to bob from
        node b, ACK_A to bob, ACK_N back to alice on node a."""
        self.alice.send(P.MsgR(1, self.uids["bob"], "hi"))
        self.turn()
        [msg_a] = self.alice.received()
        self.assertIsInstance(msg_a, P.MsgA)
        [msg_n] = self.bob.received()
        self.assertEqual((msg_n.seq, msg_n.sender, msg_n.body), (1, self.uids["alice"], "hi"))
        self.bob.send(P.AckR(1))
        self.turn()
        self.assertEqual(self.bob.received(), [P.AckA(1)])
        self.assertEqual(self.alice.received(), [P.AckN(1, msg_a.msg_id)])

    def test_late_ack_retransmits_on_the_receivers_node(self) -> None:
        """A MSG_N that came from another node is sent again by the
        receiver's node when its ACK_R is late, with the same seq."""
        self.alice.send(P.MsgR(1, self.uids["bob"], "hi"))
        self.turn()
        [first] = self.bob.received()
        self.a.reactor.advance(11)
        self.b.messenger.resend_late()
        self.a.messenger.resend_late()
        self.turn()
        self.assertEqual(self.bob.received(), [first])

    def test_lost_publication_is_caught_up_once(self) -> None:
        """A publication that never arrives loses nothing: the receiver's
        node pushes the message from the store in its next round, and not
        again while the push waits for its ack."""
        self.registry.lose_publications = True
        self.alice.send(P.MsgR(1, self.uids["bob"], "lost"))
        self.turn()
        self.assertEqual(self.bob.received(), [])
        self.registry.lose_publications = False
        self.b.messenger.catch_up()
        self.turn()
        [msg_n] = self.bob.received()
        self.assertEqual((msg_n.seq, msg_n.body), (1, "lost"))
        self.b.messenger.catch_up()
        self.turn()
        self.assertEqual(self.bob.received(), [])
        self.bob.send(P.AckR(1))
        self.turn()
        self.b.messenger.catch_up()
        self.turn()
        self.assertEqual(self.bob.received(), [P.AckA(1)])

    def test_late_publication_after_catch_up_not_pushed_twice(self) -> None:
        """A publication slower than the catch-up round: the message is
        pushed once, by the catch-up, whether the publication comes while
        the push waits for its ack or after the ack."""
        self.registry.held = []
        self.alice.send(P.MsgR(1, self.uids["bob"], "slow"))
        self.alice.send(P.MsgR(2, self.uids["bob"], "slower"))
        self.turn()
        self.b.messenger.catch_up()
        self.turn()
        self.assertEqual([m.body for m in self.bob.received()], ["slow", "slower"])
        self.bob.send(P.AckR(1))
        self.turn()
        self.assertEqual(self.bob.received(), [P.AckA(1)])
        self.registry.deliver_held()
        self.turn()
        self.assertEqual(self.bob.received(), [])

    def test_catch_up_leaves_what_was_acked_during_the_read(self) -> None:
        """An ACK_R that came while the catch-up read the inbox (it is not
        in what the store answered): that message is not pushed again."""
        self.alice.send(P.MsgR(1, self.uids["bob"], "hi"))
        self.turn()
        [msg_n] = self.bob.received()
        self.b.messenger.catch_up()  # reads the inbox heads
        self.bob.send(P.AckR(msg_n.seq))
        self.turn()
        self.assertEqual(self.bob.received(), [P.AckA(1)])

    def test_catch_up_fills_a_gap_below_a_pending_push(self) -> None:
        """A publication was lost, and a later message from a user of the
        receiver's own node was pushed: the catch-up pushes the missing one
        (the client, which acks cumulatively, waits for it)."""
        db = self.a.store._db
        assert db is not None
        make_friends_txn(db, self.uids["carol"], self.uids["bob"], 0)
        carol = self.b.connect()
        carol.login("carol")
        self.turn()
        self.assertEqual(self.bob.received(), [P.Presence(self.uids["carol"], True)])
        self.registry.lose_publications = True
        self.alice.send(P.MsgR(1, self.uids["bob"], "lost"))
        self.turn()
        self.registry.lose_publications = False
        carol.send(P.MsgR(1, self.uids["bob"], "local"))
        self.turn()
        self.assertEqual([(m.seq, m.body) for m in self.bob.received()], [(2, "local")])
        self.b.messenger.catch_up()
        self.turn()
        self.assertEqual([(m.seq, m.body) for m in self.bob.received()], [(1, "lost")])

    def test_catch_up_leaves_what_the_client_pulls(self) -> None:
        """Entries up to the inbox_max of RESUMED are the client's to pull:
        catching up pushes only what came after."""
        self.bob.drop()
        self.alice.send(P.MsgR(1, self.uids["bob"], "while away"))
        self.turn()
        again = self.b.connect()
        again.send(resume_for(self.bob_welcome))
        self.turn()
        [resumed] = again.received()
        self.assertEqual(resumed.inbox_max, 1)
        self.b.messenger.catch_up()
        self.turn()
        self.assertEqual(again.received(), [])

    def test_http_token_works_on_the_other_node(self) -> None:
        """bob's bearer token from node b authenticates on node a's HTTP."""
        status, body = self.a.http("GET", "/v1/versions", self.bob_welcome.token)
        self.assertEqual(status, 200, body)
        status, _ = self.a.http("GET", "/v1/versions", "not-a-token")
        self.assertEqual(status, 401)

    def test_changed_reaches_the_other_node(self) -> None:
        """A list change made through node a's HTTP reaches bob on node b as
        CHANGED at once."""
        token = self.alice_token()
        status, _ = self.a.http("DELETE", f"/v1/friends/{self.uids['bob']}", token)
        self.assertEqual(status, 204)
        self.turn()
        self.assertIn("friends", [p.what for p in self.bob.received()
                                  if isinstance(p, P.Changed)])

    def alice_token(self) -> str:
        session = self.a.router.session_for(self.uids["alice"])
        token: str = session.token
        return token


class SessionsAcrossNodes(FriendsOnTwoNodes):
    def resume_on_a(self, nonce: bytes = b"n0nce-01") -> Any:
        client = self.a.connect()
        client.send(resume_for(self.bob_welcome, ts=int(self.a.reactor.seconds()), nonce=nonce))
        self.turn()
        return client

    def test_resume_on_another_node(self) -> None:
        """The session made on node b resumes on node a: RESUMED with the same
        uid, no PRESENCE to anyone, and node b's copy never expires into a
        PRESENCE false later."""
        self.bob.drop()
        again = self.resume_on_a()
        [resumed] = again.received()
        self.assertIsInstance(resumed, P.Resumed)
        self.assertEqual(resumed.uid, self.uids["bob"])
        self.assertIsNone(self.b.router.session_for(self.uids["bob"]))
        self.a.reactor.advance(1000)
        self.turn()
        self.assertEqual(self.alice.received(), [])
        self.assertFalse(again.closed)

    def test_old_connection_closed_when_resumed_elsewhere(self) -> None:
        """RESUME on node a while node b still has bob's connection: node b
        closes it."""
        again = self.resume_on_a()
        self.assertIsInstance(again.received()[0], P.Resumed)
        self.assertTrue(self.bob.closed)
        self.assertEqual(self.alice.received(), [])

    def test_nonce_used_on_another_node(self) -> None:
        """A RESUME replayed on a second node (same nonce) is refused there."""
        self.bob.drop()
        again = self.resume_on_a()
        self.assertIsInstance(again.received()[0], P.Resumed)
        again.drop()
        replay = self.b.connect()
        replay.send(resume_for(self.bob_welcome, ts=int(self.a.reactor.seconds())))
        self.turn()
        [error] = replay.received()
        self.assertEqual(error.code, 409)

    def test_linger_expiry_after_moving_tells_friends_once(self) -> None:
        """bob moves to node a, drops again, never comes back: exactly one
        PRESENCE false, when node a's linger runs out."""
        self.bob.drop()
        again = self.resume_on_a()
        again.drop()
        self.a.reactor.advance(299)
        self.turn()
        self.assertEqual(self.alice.received(), [])
        self.a.reactor.advance(1)
        self.turn()
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], False)])
        self.a.reactor.advance(1000)
        self.turn()
        self.assertEqual(self.alice.received(), [])

    def test_login_on_another_node_replaces_quietly(self) -> None:
        """bob logs in again on node a: node b's connection gets KICKED 1,
        alice sees no PRESENCE at all."""
        again = self.a.connect()
        again.login("bob")
        self.turn()
        self.assertIn(P.Kicked(P.KICKED_REPLACED), self.bob.received())
        self.assertEqual(self.alice.received(), [])
        self.a.reactor.advance(1000)
        self.turn()
        self.assertEqual(self.alice.received(), [])

    def test_stale_copy_ends_without_presence(self) -> None:
        """A node whose copy of a session was taken ends it without telling
        the friends, even if the notice has not arrived yet."""
        self.bob.drop()
        self.registry.lose_publications = True
        self.resume_on_a()
        self.registry.lose_publications = False
        stale = self.b.router.session_for(self.uids["bob"])
        self.b.sessions.end(stale)
        self.turn()
        self.assertEqual(self.alice.received(), [])

    def test_adopted_session_resumes_or_expires(self) -> None:
        """Node b dies; node a adopts its sessions: bob resumes there, and a
        session nobody resumes ends after the linger with one PRESENCE false."""
        self.bob.drop()
        records = []
        for sid, record in self.registry.records.items():
            if record["node"] == "b":
                record["node"] = "a"
                self.registry.users[record["uid"]] = ("a", sid)
                records.append({**record, "session_id": sid})
        self.a.sessions.adopt(records)
        self.turn()
        self.a.reactor.advance(300)
        self.turn()
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], False)])


class AnswerLater(LocalRouter):
    """One node whose registry answers a session's end later (Redis away)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[Deferred[bool]] = []

    def release(self, session: Any, was_current: bool, connected: bool = False) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.answers.append(d)
        return d.addCallback(lambda mine: mine and was_current)


class LateAnswers(SynchronousTestCase):
    def test_newer_login_meanwhile_is_not_reported_offline(self) -> None:
        """alice's linger ran out while the registry could not answer; she
        logged in again before it did: when the answer comes (it was her
        session), bob sees no PRESENCE false for a user who is online."""
        router = AnswerLater()
        node = Harness(router=router)
        uids = {name: add_user(node.store, name) for name in ("alice", "bob")}
        db = node.store._db
        assert db is not None
        make_friends_txn(db, uids["alice"], uids["bob"], 0)
        bob = node.connect()
        bob.login("bob")
        alice = node.connect()
        alice.login("alice")
        node.turn()
        self.assertEqual(bob.received(), [P.Presence(uids["alice"], True)])
        alice.drop()
        node.reactor.advance(301)  # the linger runs out
        self.assertEqual(len(router.answers), 1)
        again = node.connect()
        again.login("alice")
        node.turn()
        router.answers[0].callback(True)
        node.turn()
        self.assertEqual(bob.received(), [P.Presence(uids["alice"], True)])
