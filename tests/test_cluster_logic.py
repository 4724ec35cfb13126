"""The logic layer across nodes: devices, messages and presence when a
user's devices are on several nodes.

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

from im58d.logic import packets as L
from im58d.proof import resume_mac
from im58d.routing.local import LocalRouter
from im58d.store.accounts import make_friends_txn
from im58d.tap import join_cluster
from im58d.wire import packets as P

from .support import Client, Harness, add_user

PHONE = b"phone-of-the-use"
LAPTOP = b"laptop-of-the-us"


class Registry:
    """What Redis holds for the nodes: uid -> {sid: node}, session copies."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.users: dict[int, dict[bytes, str]] = {}
        self.gens: dict[bytes, int] = {}
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

    def node_of(self, sid: bytes) -> str | None:
        for devices in self.users.values():
            if sid in devices:
                return devices[sid]
        return None


class ClusterRouter(LocalRouter):
    clustered = True

    def __init__(self, registry: Registry, node: str) -> None:
        super().__init__()
        self.registry = registry
        self.node = node
        registry.routers[node] = self

    def register(self, device: Any, first: bool) -> Deferred[tuple[bool, bool]]:
        devices = self.registry.users.setdefault(device.uid, {})
        came_from = devices.get(device.session_id)
        gen = max(self.registry.gens.get(device.session_id, 0), device.gen)
        if came_from is not None and came_from != self.node:
            gen += 1
            self.registry.publish(came_from, "on_gone", device.session_id, gen)
        self.registry.gens[device.session_id] = device.gen = gen
        first = not devices and came_from is None
        devices[device.session_id] = self.node
        return succeed((first, came_from is None))

    def release(self, device: Any, last: bool, connected: bool) -> Deferred[tuple[bool, bool]]:
        devices = self.registry.users.get(device.uid, {})
        if devices.get(device.session_id) != self.node:
            return succeed((False, False))
        del devices[device.session_id]
        if devices:
            return succeed((True, False))
        del self.registry.users[device.uid]
        return succeed((True, True))

    def online_among(self, uids: list[int]) -> Deferred[list[int]]:
        return succeed([uid for uid in uids if self.registry.users.get(uid)])

    def forward(self, items: list[tuple[int, int, Any, bytes | None]]) -> None:
        by_node: dict[str, list[Any]] = {}
        for uid, seq, packet, skip in items:
            for node in set(self.registry.users.get(uid, {}).values()) - {self.node}:
                by_node.setdefault(node, []).append(
                    [uid, seq, L.CODE[type(packet)], list(packet), skip])
        for node, some in by_node.items():
            self.registry.publish(node, "on_packets", some)

    def forward_lists(self, uids: list[int]) -> None:
        by_node: dict[str, list[int]] = {}
        for uid in uids:
            for node in set(self.registry.users.get(uid, {}).values()) - {self.node}:
                by_node.setdefault(node, []).append(uid)
        for node, some in by_node.items():
            self.registry.publish(node, "on_lists", some)

    def end_elsewhere(self, session_ids: list[bytes], reason: int) -> None:
        for sid in session_ids:
            node = self.registry.node_of(sid)
            if node is not None and node != self.node:
                self.registry.publish(node, "on_ended", sid, reason)


def resume(welcome: P.Welcome, ts: int, nonce: int) -> P.Resume:
    n = nonce.to_bytes(8, "big")
    return P.Resume(welcome.session_id, ts, n,
                    resume_mac(welcome.session_key, welcome.session_id, ts, n))


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

    def now(self) -> int:
        return int(self.a.reactor.seconds())


class FriendsOnTwoNodes(TwoNodes):
    """alice signed in on node a, her friend bob on node b."""

    def setUp(self) -> None:
        super().setUp()
        self.alice = self.a.connect()
        self.alice_welcome = self.alice.login("alice")
        self.bob = self.b.connect()
        self.bob_welcome = self.bob.login("bob")
        self.turn()
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], True)])


class MessagesAcrossNodes(FriendsOnTwoNodes):
    def test_six_packets_across_nodes(self) -> None:
        """alice on node a, bob on node b: MSG_A to alice with her seq,
        MSG_N to bob from node b, ACK_A to bob, ACK_N [alice's seq] back to
        alice on node a."""
        self.alice.send(P.MsgR(1, self.uids["bob"], "hi"))
        self.turn()
        [msg_a] = self.alice.received()
        self.assertEqual((msg_a.cmid, msg_a.seq), (1, 1))
        [msg_n] = self.bob.received()
        self.assertEqual((msg_n.seq, msg_n.sender, msg_n.body), (1, self.uids["alice"], "hi"))
        self.bob.send(P.AckR(1))
        self.turn()
        self.assertEqual(self.bob.received(), [P.AckA(1)])
        self.assertEqual(self.alice.received(), [P.AckN(msg_a.seq)])

    def test_two_devices_on_two_nodes_both_get_every_message(self) -> None:
        """bob's second device is on node a, his first on node b: both get
        every message to bob (each once), and when one of them sends, the
        other gets the copy with ``to`` on its own node."""
        laptop = self.a.connect()
        laptop.login("bob", device=LAPTOP)
        self.turn()
        self.assertEqual(self.alice.received(), [])  # bob was online already
        self.assertEqual([p.what for p in self.bob.received()], ["devices"])
        for cmid in (1, 2, 3):
            self.alice.send(P.MsgR(cmid, self.uids["bob"], f"m{cmid}"))
        self.turn()
        for device in (self.bob, laptop):
            self.assertEqual([(p.seq, p.body) for p in device.received()],
                             [(1, "m1"), (2, "m2"), (3, "m3")])
        laptop.send(P.MsgR(1, self.uids["alice"], "from the laptop"))
        self.turn()
        [msg_a] = laptop.received()
        self.assertEqual(msg_a.seq, 4)
        self.assertEqual(self.bob.received(), [
            P.MsgN(4, msg_a.msg_id, self.uids["bob"], "from the laptop", self.now(), None,
                   self.uids["alice"])])
        self.assertEqual([p.body for p in self.alice.received() if isinstance(p, P.MsgN)],
                         ["from the laptop"])

    def test_ack_n_reaches_the_senders_devices_on_every_node(self) -> None:
        """alice has a second device on node b: when bob acks, ACK_N reaches
        both of her devices, on both nodes."""
        second = self.b.connect()
        second.login("alice", device=LAPTOP)
        self.turn()
        self.assertEqual([p.what for p in self.alice.received()], ["devices"])
        self.alice.send(P.MsgR(1, self.uids["bob"], "hi"))
        self.turn()
        [msg_a] = self.alice.received()
        self.assertEqual([type(p) for p in second.received()], [P.MsgN])  # the copy
        self.bob.send(P.AckR(self.bob.received()[0].seq))
        self.turn()
        self.assertEqual(self.alice.received(), [P.AckN(msg_a.seq)])
        self.assertEqual(second.received(), [P.AckN(msg_a.seq)])

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

    def test_catch_up_pushes_no_device_its_own_message(self) -> None:
        """A catch-up round pushes a user's other devices the copy of what
        the user sent, never the sending device (it had the MSG_A)."""
        laptop = self.b.connect()
        laptop.login("alice", device=LAPTOP)
        self.turn()
        self.assertEqual([p.what for p in self.alice.received()], ["devices"])
        self.registry.lose_publications = True
        self.alice.send(P.MsgR(1, self.uids["bob"], "sent"))
        self.turn()
        self.registry.lose_publications = False
        self.assertEqual(laptop.received(), [])
        self.a.messenger.catch_up()
        self.b.messenger.catch_up()
        self.turn()
        self.assertEqual([type(p) for p in self.alice.received()], [P.MsgA])
        [copy] = laptop.received()
        self.assertEqual((copy.body, copy.to), ("sent", self.uids["bob"]))

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
        """An ACK_R that came while the catch-up read the timeline (it is not
        in what the store answered): that message is not pushed again."""
        self.alice.send(P.MsgR(1, self.uids["bob"], "hi"))
        self.turn()
        [msg_n] = self.bob.received()
        self.b.messenger.catch_up()  # reads the timeline heads
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
        """Entries up to the inbox_max of RESUMED are the device's to pull:
        catching up pushes only what came after."""
        self.bob.drop()
        self.alice.send(P.MsgR(1, self.uids["bob"], "while away"))
        self.turn()
        again = self.b.connect()
        again.send(resume(self.bob_welcome, self.now(), 1))
        self.turn()
        [resumed] = again.received()
        self.assertEqual(resumed.inbox_max, 1)
        self.b.messenger.catch_up()
        self.turn()
        self.assertEqual(again.received(), [])

    def test_http_token_works_on_the_other_node(self) -> None:
        """bob's bearer token from node b authenticates on node a's HTTP (the
        store, shared by the nodes, has every session)."""
        status, body = self.a.http("GET", "/v1/versions", self.bob_welcome.token)
        self.assertEqual(status, 200, body)
        status, _ = self.a.http("GET", "/v1/versions", "not-a-token")
        self.assertEqual(status, 401)

    def test_changed_reaches_the_other_node(self) -> None:
        """A list change made through node a's HTTP reaches bob on node b as
        CHANGED at once."""
        status, _ = self.a.http("DELETE", f"/v1/friends/{self.uids['bob']}",
                                self.alice_welcome.token)
        self.assertEqual(status, 204)
        self.turn()
        self.assertIn("friends", [p.what for p in self.bob.received()
                                  if isinstance(p, P.Changed)])


class DevicesAcrossNodes(FriendsOnTwoNodes):
    def resume_on_a(self, nonce: int = 1) -> Client:
        client = self.a.connect()
        client.send(resume(self.bob_welcome, self.now(), nonce))
        self.turn()
        return client

    def test_resume_on_another_node(self) -> None:
        """The session made on node b resumes on node a: RESUMED with the same
        uid, no PRESENCE to anyone and no ONLINE (the device was online), and
        node b's copy never goes offline into a PRESENCE false later."""
        self.bob.drop()
        again = self.resume_on_a()
        [resumed] = again.received()
        self.assertIsInstance(resumed, P.Resumed)
        self.assertEqual(resumed.uid, self.uids["bob"])
        self.assertIsNone(self.b.router.user(self.uids["bob"]))
        self.a.reactor.advance(1000)
        self.turn()
        self.assertEqual(self.alice.received(), [])
        self.assertFalse(again.closed)

    def test_old_connection_kicked_when_resumed_elsewhere(self) -> None:
        """RESUME on node a while node b still has bob's connection (a second
        client of the same device, or a half-open connection): node b sends
        it KICKED 1 and closes it; nobody sees a PRESENCE."""
        again = self.resume_on_a()
        self.assertIsInstance(again.received()[0], P.Resumed)
        self.assertEqual(self.bob.received(), [P.Kicked(P.KICKED_REPLACED)])
        self.assertTrue(self.bob.closed)
        self.assertEqual(self.alice.received(), [])

    def test_nonce_replayed_on_another_node(self) -> None:
        """A RESUME replayed on a second node (same nonce) is refused there:
        the nonce is recorded in the store, which every node shares."""
        self.bob.drop()
        again = self.resume_on_a(5)
        self.assertIsInstance(again.received()[0], P.Resumed)
        again.drop()
        replay = self.b.connect()
        replay.send(resume(self.bob_welcome, self.now(), 5))
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

    def test_login_of_the_same_device_on_another_node(self) -> None:
        """bob's device signs in again on node a: node b's connection gets
        KICKED 1, alice sees no PRESENCE at all."""
        again = self.a.connect()
        again.login("bob")
        self.turn()
        self.assertIn(P.Kicked(P.KICKED_REPLACED), self.bob.received())
        self.assertEqual(self.alice.received(), [])
        self.a.reactor.advance(1000)
        self.turn()
        self.assertEqual(self.alice.received(), [])

    def test_sign_out_reaches_the_device_on_another_node(self) -> None:
        """bob signs his phone (online on node b) out from his laptop over
        node a's HTTP: the phone gets KICKED 5 on node b, and alice sees bob
        stay online (the laptop) until the laptop says BYE."""
        laptop = self.a.connect()
        welcome = laptop.login("bob", device=LAPTOP)
        self.turn()
        status, _ = self.a.http("DELETE", "/v1/devices/dGVzdC1kZXZpY2UtMDAwMQ", welcome.token)
        self.assertEqual(status, 204)
        self.turn()
        self.assertIn(P.Kicked(P.KICKED_SIGNED_OUT), self.bob.received())
        self.assertEqual(self.alice.received(), [])
        laptop.send(P.Bye())
        self.turn()
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], False)])

    def test_presence_with_devices_on_two_nodes(self) -> None:
        """bob online on node b, then also on node a: no PRESENCE; his device
        on b goes offline: none; the last one, on a, goes: one PRESENCE false."""
        laptop = self.a.connect()
        laptop.login("bob", device=LAPTOP)
        self.turn()
        self.bob.send(P.Bye())
        self.turn()
        self.assertEqual(self.alice.received(), [])
        laptop.send(P.Bye())
        self.turn()
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], False)])

    def test_online_lists_friends_on_other_nodes(self) -> None:
        """ONLINE after WELCOME names the friends online on any node."""
        second = self.a.connect()
        second.send(P.Login("alice", "pw", LAPTOP))
        self.turn()
        packets = second.received()
        self.assertEqual(packets[1], P.Online((self.uids["bob"],)))

    def test_stale_copy_goes_without_presence(self) -> None:
        """A node whose copy of a device was taken by another node takes it
        offline without telling the friends, even before the notice came."""
        self.bob.drop()
        self.registry.lose_publications = True
        self.resume_on_a()
        self.registry.lose_publications = False
        stale = self.b.router.device_by_id(self.bob_welcome.session_id)
        self.b.sessions.bye(stale)
        self.turn()
        self.assertEqual(self.alice.received(), [])
        # and the store still has the device online (it is, on node a)
        status, body = self.a.http("GET", "/v1/devices", self.bob_welcome.token)
        self.assertEqual([d["online"] for d in body["devices"]], [True])

    def test_adopted_device_resumes_or_goes_offline(self) -> None:
        """Node b dies; node a adopts its devices: bob's lingers there, and
        a device nobody resumes goes offline after the linger with one
        PRESENCE false."""
        self.bob.drop()
        records = []
        devices = self.registry.users[self.uids["bob"]]
        for sid in list(devices):
            devices[sid] = "a"
            record = self.a.store.session(sid)
            self.turn()
            records.append(self.successResultOf(record))
        self.a.sessions.adopt(records)
        self.turn()
        self.a.reactor.advance(300)
        self.turn()
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], False)])


class AnswerLater(LocalRouter):
    """One node whose registry answers a device's release later (Redis away)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[Deferred[bool]] = []

    def release(self, device: Any, last: bool, connected: bool) -> Deferred[tuple[bool, bool]]:
        d: Deferred[bool] = Deferred()
        self.answers.append(d)
        return d.addCallback(lambda was_last: (True, was_last and last))


class LateAnswers(SynchronousTestCase):
    def test_newer_sign_in_meanwhile_is_not_reported_offline(self) -> None:
        """alice's linger ran out while the registry could not answer; she
        signed in again before it did: when the answer comes (it was her
        last device), bob sees no PRESENCE false for a user who is online."""
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
