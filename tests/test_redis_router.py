"""``RedisRouter`` against a real ``redis-server``: the node registry (IP
list, adoption of a dead node's sessions), the shared sessions (register,
fetch, take, nonces, release, tokens), delivery to other nodes by pub/sub,
and what a node does while Redis is away and when it is back.

Each test has its own redis-server (``tests.redis_server``).  The routers
talk to it over real sockets, through the real reactor, but each has a
``Clock`` of its own: the registry refresh timer never fires by itself, a
test refreshes with ``router._refresh_now()`` (or advances the clock).
Real time passes only where a real socket must deliver something (pub/sub,
a reconnection), and then ``until`` polls with a deadline.  Where one node
must lose Redis while Redis keeps its data (and the other nodes keep
Redis), that node reaches Redis through a ``Relay`` that the test cuts.
"""

from __future__ import annotations

import base64
import os
import signal
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from im58d.routing.iplist import AccessServer, IPList
from im58d.routing.redis import NONCE_TTL, RedisRouter

from .e2e import until
from .redis_server import HOST, SKIP, RedisServer, Relay

# a realistic Unix time for the sessions' start
T0 = 1_800_000_000.25
# seconds to wait for a node to (re)join: reconnect backoff is at most 5 s
REJOIN = 20.0

SERVERS = {
    "a": [AccessServer("10.0.0.1", 5222, False, 3)],
    "b": [AccessServer("10.0.0.2", 5222, True, 1), AccessServer("10.0.0.2", 443, True, 2)],
    "c": [AccessServer("10.0.0.3", 5222, False, 1)],
}


class FakeSession:
    """What the router reads of a session (``im58d.access.session.Session``)."""

    def __init__(
        self,
        uid: int,
        *,
        client: str | None = "app/1.0",
        started: float = T0,
        device: str = "phone",
        session_id: bytes | None = None,
        session_key: bytes | None = None,
        token: str | None = None,
        gen: int = 0,
    ) -> None:
        self.uid = uid
        self.session_id = session_id or os.urandom(16)
        self.session_key = session_key or os.urandom(32)
        self.token = token or base64.urlsafe_b64encode(os.urandom(24)).decode("ascii")
        self.device = device
        self.client = client
        self.started = started
        self.gen = gen
        self.ended = False
        # the client's connection to this node (None: lingering)
        self.connection: Any = None

    @classmethod
    def from_record(cls, session_id: bytes, record: dict[str, Any]) -> FakeSession:
        """As ``SessionManager._from_record`` makes it, for RESUME or adoption."""
        return cls(
            record["uid"],
            client=record["client"],
            started=record["started"],
            device=record["device"],
            session_id=session_id,
            session_key=record["key"],
            token=record["token"],
            gen=record["gen"],
        )

    @property
    def sid(self) -> bytes:
        """The SID as Redis keys and values spell it."""
        return self.session_id.hex().encode()


class Node:
    """A router with recorders for its handlers.  Adopted sessions are kept
    in the router, as ``SessionManager.adopt`` does."""

    def __init__(self, router: RedisRouter, clock: Clock) -> None:
        self.router = router
        self.clock = clock
        self.packets: list[list[Any]] = []
        self.lists: list[list[int]] = []
        self.gone: list[tuple[bytes, int | None, bool]] = []
        self.adopted: list[list[dict[str, Any]]] = []
        self.revived: list[Any] = []
        self.rejoined = 0
        self.stopped = False
        router.on_packets = self.packets.append
        router.on_lists = self.lists.append
        router.on_gone = lambda sid, gen, replaced: self.gone.append((sid, gen, replaced))
        router.on_adopt = self._adopt
        router.on_revived = self.revived.append
        router.on_rejoined = self._rejoined

    def _adopt(self, records: list[dict[str, Any]]) -> None:
        self.adopted.append(records)
        for record in records:
            self.router.attach(FakeSession.from_record(record["session_id"], record))

    def _rejoined(self) -> None:
        self.rejoined += 1

    @property
    def joined(self) -> bool:
        """Up, and done recording what it has (the join is over)."""
        return self.router.up and self.router._joining is None

    async def login(self, session: FakeSession) -> bool:
        """As ``SessionManager.login``: register, then keep it here."""
        replaced: bool = await self.router.register(session)
        self.router.attach(session)
        return replaced

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.router.stop()

    async def crash(self) -> None:
        """The node's process dies: its connections close, nothing is said
        to Redis (its entry stays until its TTL)."""
        self.stopped = True
        self.router._stopping = True
        await self.router._commands.disconnect()
        await self.router._subscriber.disconnect()


def addresses(*names: str) -> tuple[AccessServer, ...]:
    """The IP list's servers of the nodes ``names``, in the list's order."""
    servers = [s for name in names for s in SERVERS[name]]
    return tuple(sorted(servers, key=lambda s: (s.host, s.port, s.tls)))


class RedisRouterTestCase(TestCase):
    """A redis-server of the test's own; nodes started by each test."""

    skip = SKIP
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.server = RedisServer(os.path.join(self.mktemp(), "redis"))
        await self.server.start()
        self.addCleanup(self.server.stop)

    async def redis(self, *args: Any) -> Any:
        """One raw Redis command, over a connection of its own."""
        conn = await txredisapi.Connection(
            HOST, self.server.port, reconnect=False, charset=None, convertNumbers=False
        )
        try:
            return await conn.execute_command(*args)
        finally:
            await conn.disconnect()

    async def node(self, name: str, endpoint: str | None = None, node_ttl: int = 15) -> Node:
        """Start node ``name`` (its servers from SERVERS) and wait until it joined."""
        listed = list(SERVERS[name])
        clock = Clock()
        router = RedisRouter(
            endpoint or self.server.endpoint, clock, IPList([]), lambda: list(listed),
            node_ttl=node_ttl, node=name,
        )
        node = Node(router, clock)
        router.start(reactor)
        self.addCleanup(node.stop)
        await until(lambda: node.joined and node.rejoined == 1, what=f"node {name} joining")
        return node

    async def relayed(self, name: str) -> tuple[Node, Relay]:
        """Node ``name``, reaching Redis through a relay."""
        relay = Relay(self.server.port)
        await relay.listen()
        self.addCleanup(relay.cut)
        return await self.node(name, endpoint=relay.endpoint), relay

    async def cut_off(self, node: Node, relay: Relay) -> None:
        """``node`` loses Redis (the others keep it) and knows it."""
        await relay.cut()
        await until(lambda: not node.router.up, what=f"node {node.router.node} cut off")

    async def rejoined(self, node: Node, times: int = 2) -> None:
        await until(lambda: node.joined and node.rejoined >= times, REJOIN,
                    f"node {node.router.node} rejoining")

    async def expire(self, name: str) -> None:
        """Node ``name``'s registry entry expires (its TTL ends now)."""
        await self.redis("PEXPIRE", f"im58d:node:{name}", 1)
        for _ in range(100):
            if not await self.redis("EXISTS", f"im58d:node:{name}"):
                return
            await deferLater(reactor, 0.005)
        self.fail(f"the entry of node {name} did not expire")

    def signal_server(self, sig: int) -> None:
        """SIGSTOP or SIGCONT to redis-server."""
        if self.server.running:
            transport: Any = self.server.transport
            transport.signalProcess(sig)

    async def resumed_on(self, node: Node, session: FakeSession) -> FakeSession:
        """As a RESUME on ``node`` does: fetch the record, take the session;
        the node's copy."""
        record = await node.router.fetch(session.session_id)
        assert record is not None
        copy = FakeSession.from_record(session.session_id, record)
        self.assertIs(await node.router.take(copy), True)
        return copy

    async def owner(self, uid: int) -> bytes | None:
        """``"NODE SID"``: where Redis says the user's session is."""
        value: bytes | None = await self.redis("HGET", "im58d:users", uid)
        return value

    async def members(self, key: str) -> set[bytes]:
        return set(await self.redis("SMEMBERS", key))

    async def barrier(self, node: Node) -> None:
        """Whatever ``node`` sent Redis before has been answered and handled
        (replies come in order on its one connection)."""
        await node.router._call("PING")


class IPListTests(RedisRouterTestCase):
    async def test_every_live_node_listed(self) -> None:
        """Every node's IP list (GET /v1/iplist) shows the access servers of
        all live nodes with their weights, and every node gives the same
        version, so clients see one list whichever node they ask."""
        a = await self.node("a")
        b = await self.node("b")
        await a.router._refresh_now()
        await b.router._refresh_now()
        both = addresses("a", "b")
        self.assertEqual(a.router.iplist.servers, both)
        self.assertEqual(b.router.iplist.servers, both)
        self.assertEqual(a.router.iplist.version, b.router.iplist.version)
        self.assertEqual(a.router.iplist.version, IPList(list(both)).version)
        weights = {(s["host"], s["port"]): s["weight"]
                   for s in a.router.iplist.as_json()["servers"]}
        self.assertEqual(weights, {("10.0.0.1", 5222): 3, ("10.0.0.2", 5222): 1,
                                   ("10.0.0.2", 443): 2})
        self.assertEqual(a.router.live_nodes, 2)

    async def test_stopped_node_leaves_and_comes_back(self) -> None:
        """A node that stops is gone from the other nodes' IP lists at their
        next refresh (new version, clients stop trying it); when it runs
        again it is back, with the version of the full list again."""
        a = await self.node("a")
        b = await self.node("b")
        await a.router._refresh_now()
        full = a.router.iplist.version
        await b.stop()
        await a.router._refresh_now()
        self.assertEqual(a.router.iplist.servers, addresses("a"))
        self.assertNotEqual(a.router.iplist.version, full)
        self.assertEqual(a.router.live_nodes, 1)
        await self.node("b")
        await a.router._refresh_now()
        self.assertEqual(a.router.iplist.servers, addresses("a", "b"))
        self.assertEqual(a.router.iplist.version, full)

    async def test_expired_node_leaves_until_it_refreshes(self) -> None:
        """A node that stops refreshing (hung, killed, cut off) has an entry
        with a TTL of node_ttl seconds: when it expires the node leaves the
        other nodes' IP lists; its next refresh brings it back."""
        a = await self.node("a", node_ttl=3)
        b = await self.node("b", node_ttl=3)
        ttl = await self.redis("TTL", "im58d:node:b")
        self.assertTrue(0 < int(ttl) <= 3, ttl)
        await a.router._refresh_now()
        full = a.router.iplist.version
        self.assertEqual(a.router.iplist.servers, addresses("a", "b"))
        await self.expire("b")
        await a.router._refresh_now()
        self.assertEqual(a.router.iplist.servers, addresses("a"))
        dropped = a.router.iplist.version
        self.assertNotEqual(dropped, full)
        await b.router._refresh_now()
        await a.router._refresh_now()
        self.assertEqual(a.router.iplist.servers, addresses("a", "b"))
        self.assertNotEqual(a.router.iplist.version, dropped)
        self.assertEqual(a.router.iplist.version, full)
        self.assertEqual(b.router.iplist.version, full)


class SessionTests(RedisRouterTestCase):
    async def test_login_replaces_session_on_other_node(self) -> None:
        """A user's first login is new everywhere (friends see them come
        online); a login on node b while the user has a session on node a
        replaces it: the login knows it (no second PRESENCE) and node a is
        told to end its session quietly (KICKED replaced)."""
        a = await self.node("a")
        b = await self.node("b")
        first = FakeSession(7)
        self.assertIs(await a.login(first), False)
        second = FakeSession(7)
        self.assertIs(await b.login(second), True)
        await until(lambda: a.gone, what="node a told")
        self.assertEqual(a.gone, [(first.session_id, None, True)])
        self.assertEqual(b.gone, [])
        self.assertEqual(await self.owner(7), b"b " + second.sid)
        self.assertEqual(await self.redis("EXISTS", f"im58d:session:{first.sid.decode()}"), 0)
        self.assertEqual(await self.redis("EXISTS", f"im58d:token:{first.token}"), 0)
        self.assertEqual(await self.members("im58d:held:a"), set())
        self.assertEqual(await self.members("im58d:held:b"), {second.sid})
        self.assertIsNone(await b.router.fetch(first.session_id))
        self.assertIsNone(await a.router.token_uid(first.token))
        self.assertEqual(await a.router.token_uid(second.token), 7)

    async def test_login_again_on_same_node_publishes_nothing(self) -> None:
        """A second login on the same node replaces the first there (the
        node sees it in its own dicts): nothing is published."""
        a = await self.node("a")
        self.assertIs(await a.login(FakeSession(8)), False)
        published = a.router.published
        newer = FakeSession(8)
        self.assertIs(await a.login(newer), True)
        self.assertEqual(a.router.published, published)
        self.assertEqual(await self.owner(8), b"a " + newer.sid)

    async def test_fetch_gives_record_of_other_nodes_session(self) -> None:
        """A client resuming on node b a session made on node a: node b reads
        the session's record (uid, key, token, device, client, start, gen)
        exactly as node a made it; a session without a client string gives
        None; an unknown session gives None (ERROR 409)."""
        a = await self.node("a")
        b = await self.node("b")
        session = FakeSession(9, client="ios/2.1 (é)", device="Pixel 8 — ünï", started=T0 + 0.125)
        await a.login(session)
        record = await b.router.fetch(session.session_id)
        self.assertEqual(record, {
            "uid": 9, "key": session.session_key, "token": session.token,
            "device": "Pixel 8 — ünï", "client": "ios/2.1 (é)", "started": T0 + 0.125,
            "gen": 0,
        })
        bare = FakeSession(10, client=None)
        await a.login(bare)
        record = await b.router.fetch(bare.session_id)
        assert record is not None
        self.assertIsNone(record["client"])
        self.assertIsNone(await b.router.fetch(os.urandom(16)))

    async def test_take_moves_session(self) -> None:
        """RESUME on node b of a session on node a moves it to b: the take
        succeeds with a larger generation and node a is told to drop its
        copy (it closes the old connection without a word to the friends)."""
        a = await self.node("a")
        b = await self.node("b")
        session = FakeSession(11)
        await a.login(session)
        copy = await self.resumed_on(b, session)
        self.assertGreater(copy.gen, session.gen)
        await until(lambda: a.gone, what="node a told")
        self.assertEqual(a.gone, [(session.session_id, copy.gen, False)])
        self.assertEqual(await self.owner(11), b"b " + session.sid)
        self.assertEqual(await self.members("im58d:held:b"), {session.sid})
        self.assertEqual(await self.members("im58d:held:a"), set())
        again = await a.router.fetch(session.session_id)
        assert again is not None
        self.assertEqual(again["gen"], copy.gen)

    async def test_take_of_replaced_session_refused(self) -> None:
        """A RESUME of a session that was replaced (a newer login) or ended
        meanwhile is refused (ERROR 409), whichever node it comes to."""
        a = await self.node("a")
        b = await self.node("b")
        session = FakeSession(12)
        await a.login(session)
        record = await b.router.fetch(session.session_id)
        assert record is not None
        await a.login(FakeSession(12))  # a newer login, while the RESUME was checked
        copy = FakeSession.from_record(session.session_id, record)
        self.assertIs(await b.router.take(copy), False)
        self.assertEqual(copy.gen, record["gen"])
        ended = FakeSession(13)
        await a.login(ended)
        record = await b.router.fetch(ended.session_id)
        assert record is not None
        a.router.detach(ended)
        self.assertIs(await a.router.release(ended, True), True)
        self.assertIs(await b.router.take(FakeSession.from_record(ended.session_id, record)),
                      False)
        await self.barrier(a)
        self.assertEqual(a.gone, [])

    async def test_second_take_of_taken_session(self) -> None:
        """The session moves on: resumed on node b, then (the client's
        connection dropped again) on node c, each from the record fetched
        before; each take succeeds with a larger generation, and node b is
        told when c takes it."""
        a = await self.node("a")
        b = await self.node("b")
        c = await self.node("c")
        session = FakeSession(14)
        await a.login(session)
        record = await b.router.fetch(session.session_id)
        assert record is not None
        on_b = FakeSession.from_record(session.session_id, record)
        on_c = FakeSession.from_record(session.session_id, record)
        self.assertIs(await b.router.take(on_b), True)
        self.assertIs(await c.router.take(on_c), True)
        self.assertGreater(on_c.gen, on_b.gen)
        await until(lambda: b.gone, what="node b told")
        self.assertEqual(b.gone, [(session.session_id, on_c.gen, False)])

    async def test_nonce_used_once_across_nodes(self) -> None:
        """A RESUME proof (session, nonce) works once in the whole deployment:
        replayed on another node it is refused; other nonces, or the same
        nonce with another session, are fine.  Nonces are kept for twice the
        RESUME window, not forever."""
        a = await self.node("a")
        b = await self.node("b")
        sid, nonce = os.urandom(16), os.urandom(8)
        self.assertIs(await a.router.use_nonce(sid, nonce), True)
        self.assertIs(await b.router.use_nonce(sid, nonce), False)
        self.assertIs(await a.router.use_nonce(sid, nonce), False)
        self.assertIs(await b.router.use_nonce(sid, os.urandom(8)), True)
        self.assertIs(await b.router.use_nonce(os.urandom(16), nonce), True)
        ttl = int(await self.redis("TTL", f"im58d:nonce:{sid.hex()}:{nonce.hex()}"))
        self.assertTrue(NONCE_TTL - 10 < ttl <= NONCE_TTL, ttl)

    async def test_release_exactly_one_node(self) -> None:
        """When a session ends, exactly one node says it was the user's
        session (and so tells the friends: PRESENCE false): after node b
        took the session, node a ending its stale copy gets False and leaves
        b's record alone; node b ending it gets True and removes it all."""
        a = await self.node("a")
        b = await self.node("b")
        session = FakeSession(15)
        await a.login(session)
        copy = await self.resumed_on(b, session)
        a.router.detach(session)  # its linger ran out before the MOVED came
        self.assertIs(await a.router.release(session, True), False)
        self.assertEqual(await self.owner(15), b"b " + session.sid)
        self.assertIsNotNone(await b.router.fetch(session.session_id))
        self.assertEqual(await a.router.token_uid(session.token), 15)
        self.assertEqual(await self.members("im58d:held:b"), {session.sid})
        b.router.detach(copy)
        self.assertIs(await b.router.release(copy, True), True)
        self.assertIsNone(await self.owner(15))
        self.assertEqual(await self.redis("EXISTS", f"im58d:session:{session.sid.decode()}"), 0)
        self.assertEqual(await self.redis("EXISTS", f"im58d:token:{session.token}"), 0)
        self.assertEqual(await self.members("im58d:held:b"), set())
        self.assertIsNone(await a.router.fetch(session.session_id))

    async def test_token_uid_across_nodes(self) -> None:
        """An HTTP request with a bearer token works on any node: node b
        knows the uid of a session made on node a; not after it ended, and
        not for a token nobody has."""
        a = await self.node("a")
        b = await self.node("b")
        session = FakeSession(16)
        await a.login(session)
        self.assertEqual(await b.router.token_uid(session.token), 16)
        self.assertIsNone(await b.router.token_uid("no-such-token"))
        a.router.detach(session)
        self.assertIs(await a.router.release(session, True), True)
        self.assertIsNone(await b.router.token_uid(session.token))


class ForwardTests(RedisRouterTestCase):
    async def test_packets_reach_node_of_each_user(self) -> None:
        """Frames for users on other nodes reach those nodes, one publication
        per node per batch, bytes intact (binary frames, frames that look
        like numbers); frames for users with no session anywhere, or with
        their session on the sending node, go nowhere."""
        a = await self.node("a")
        b = await self.node("b")
        c = await self.node("c")
        await b.login(FakeSession(1))
        await b.login(FakeSession(2))
        await c.login(FakeSession(3))
        await a.login(FakeSession(4))
        published = a.router.published
        a.router.forward([
            (1, 5, b"123"),
            (2, 0, b"\xff\x00"),
            (3, 7, b"\x00abc\xc1"),
            (4, 8, b"mine"),
            (99, 9, b"nobody"),
            (1, 6, b""),
            (2, 10, b"1.5"),
        ])
        await until(lambda: b.packets and c.packets, what="packets delivered")
        self.assertEqual(b.packets, [[[1, 5, b"123"], [2, 0, b"\xff\x00"], [1, 6, b""],
                                      [2, 10, b"1.5"]]])
        self.assertEqual(c.packets, [[[3, 7, b"\x00abc\xc1"]]])
        for uid, seq, frame in b.packets[0] + c.packets[0]:
            self.assertIs(type(uid), int)
            self.assertIs(type(seq), int)
            self.assertIs(type(frame), bytes)
        self.assertEqual(a.router.published, published + 2)
        # nothing more comes after: lists published later arrive first
        a.router.forward_lists([1, 3])
        await until(lambda: b.lists and c.lists, what="lists delivered")
        self.assertEqual(len(b.packets), 1)
        self.assertEqual(len(c.packets), 1)
        self.assertEqual(a.packets, [])

    async def test_packets_for_nobody_go_nowhere(self) -> None:
        """Frames for users with no session in the deployment (offline: the
        store has the messages) publish nothing."""
        a = await self.node("a")
        b = await self.node("b")
        await a.login(FakeSession(4))
        published = a.router.published
        a.router.forward([(98, 1, b"x"), (99, 2, b"y"), (4, 3, b"z")])
        a.router.forward_lists([98, 4])
        a.router.forward([])
        a.router.forward_lists([])
        await self.barrier(a)
        self.assertEqual(a.router.published, published)
        await self.barrier(b)
        self.assertEqual(b.packets, [])
        self.assertEqual(b.lists, [])

    async def test_lists_reach_node_of_each_user(self) -> None:
        """A change of users' lists (a friendship, a group) reaches the nodes
        of those users, each node the uids it holds, in one publication."""
        a = await self.node("a")
        b = await self.node("b")
        c = await self.node("c")
        await b.login(FakeSession(1))
        await b.login(FakeSession(2))
        await c.login(FakeSession(3))
        a.router.forward_lists([1, 2, 3, 99])
        await until(lambda: b.lists and c.lists, what="lists delivered")
        self.assertEqual(b.lists, [[1, 2]])
        self.assertEqual(c.lists, [[3]])


class AdoptionTests(RedisRouterTestCase):
    async def test_crashed_node_sessions_adopted(self) -> None:
        """A node that dies (no goodbye): once its entry expired, the next
        node to refresh adopts its sessions (they linger there, so their
        clients can resume, and end there with PRESENCE false if they do
        not); a later RESUME on a third node takes them from the adopter."""
        a = await self.node("a")
        b = await self.node("b")
        one, two, ended = FakeSession(1, client=None), FakeSession(2), FakeSession(3)
        for session in (one, two, ended):
            await a.login(session)
        a.router.detach(ended)
        await a.router.release(ended, True)
        await a.crash()
        await self.expire("a")
        await b.router._refresh_now()
        self.assertEqual(len(b.adopted), 1)
        records = sorted(b.adopted[0], key=lambda r: r["uid"])
        self.assertEqual([r["session_id"] for r in records], [one.session_id, two.session_id])
        self.assertEqual(records[0], {
            "session_id": one.session_id, "uid": 1, "key": one.session_key,
            "token": one.token, "device": "phone", "client": None, "started": T0, "gen": 0,
        })
        self.assertEqual(await self.owner(1), b"b " + one.sid)
        self.assertEqual(await self.owner(2), b"b " + two.sid)
        self.assertEqual(await self.members("im58d:held:b"), {one.sid, two.sid})
        self.assertEqual(await self.members("im58d:nodes"), {b"b"})
        self.assertEqual(await self.redis("EXISTS", "im58d:held:a"), 0)
        self.assertEqual(b.router.iplist.servers, addresses("b"))
        # adopted once only
        await b.router._refresh_now()
        self.assertEqual(len(b.adopted), 1)
        # a RESUME on node c finds node b holding it
        c = await self.node("c")
        record = await c.router.fetch(one.session_id)
        assert record is not None
        copy = FakeSession.from_record(one.session_id, record)
        self.assertIs(await c.router.take(copy), True)
        await until(lambda: b.gone, what="node b told")
        self.assertEqual(b.gone, [(one.session_id, copy.gen, False)])
        self.assertEqual(copy.gen, 1)

    async def test_stopped_node_sessions_adopted_at_once(self) -> None:
        """A node that stops cleanly leaves the registry at once: the next
        refresh of another node adopts its sessions, without waiting for
        its entry to expire."""
        a = await self.node("a")
        b = await self.node("b")
        session = FakeSession(1)
        await a.login(session)
        await a.stop()
        await b.router._refresh_now()
        self.assertEqual([[r["session_id"] for r in records] for records in b.adopted],
                         [[session.session_id]])
        self.assertEqual(await self.owner(1), b"b " + session.sid)
        self.assertIs(b.router.session_by_id(session.session_id).uid, 1)

    async def test_exactly_one_node_adopts(self) -> None:
        """Of the nodes that survive a dead node, exactly one adopts each of
        its sessions, even when they refresh at the same moment (one
        lingering copy, one PRESENCE false when it ends)."""
        a = await self.node("a")
        b = await self.node("b")
        c = await self.node("c")
        sessions = [FakeSession(uid) for uid in (1, 2, 3)]
        for session in sessions:
            await a.login(session)
        await a.crash()
        await self.expire("a")
        await gatherResults([b.router._refresh_now(), c.router._refresh_now()])
        adopters = [n for n in (b, c) if n.adopted]
        self.assertEqual(len(adopters), 1)
        adopter = adopters[0]
        self.assertEqual(len(adopter.adopted), 1)
        self.assertEqual({r["session_id"] for r in adopter.adopted[0]},
                         {s.session_id for s in sessions})
        name = adopter.router.node.encode()
        for session in sessions:
            self.assertEqual(await self.owner(session.uid), name + b" " + session.sid)
        await gatherResults([b.router._refresh_now(), c.router._refresh_now()])
        self.assertEqual(len(b.adopted) + len(c.adopted), 1)

    async def test_slow_node_takes_its_sessions_back(self) -> None:
        """A node that was only slow (its refreshes stopped for longer than
        node_ttl, its connections stayed up) and whose sessions another node
        adopted meanwhile: at its next refresh it holds its sessions again
        in Redis (as after an outage), so that messages from other nodes
        reach its connected clients and the adopter drops its copies
        (otherwise the adopter's copy lingers, ends, and the friends see the
        user, still connected, go offline)."""
        a = await self.node("a")
        b = await self.node("b")
        session = FakeSession(1)
        await a.login(session)
        session.connection = object()  # the client stays connected to node a
        await self.redis("DEL", "im58d:node:a")  # as if it expired
        await b.router._refresh_now()
        self.assertEqual(len(b.adopted), 1)
        await a.router._refresh_now()  # a's next refresh
        await until(lambda: a.joined, what="node a done")
        self.assertEqual(await self.owner(1), b"a " + session.sid)
        await until(lambda: b.gone, 5, "node b told")
        self.assertEqual([g[0] for g in b.gone], [session.session_id])


class OutageTests(RedisRouterTestCase):
    async def test_redis_down_falls_back_and_rejoins(self) -> None:
        """While Redis is down a node serves its own users: logins go on
        (recorded later), other nodes' sessions are unknown (RESUME
        refused), bearer tokens of other nodes are unknown, nonces are
        checked locally, a BYE answers from the node's own view; all at
        once, nothing hangs.  Whether a lingering session that expired was
        still the user's waits for Redis (its client may have resumed
        elsewhere).  When Redis is back (empty: it was restarted) the node
        rejoins by itself, records its sessions again (not the ones that
        ended meanwhile), answers from its own view what waited (an empty
        Redis knows of no other claim) and catches up."""
        a = await self.node("a")
        b = await self.node("b")
        one, two, elsewhere = FakeSession(1), FakeSession(2), FakeSession(5)
        bye = FakeSession(4)
        await a.login(one)
        await a.login(two)
        await a.login(bye)
        await b.login(elsewhere)
        await self.server.stop()
        await until(lambda: not a.router.up and not b.router.up, what="routers down")
        self.assertEqual(a.router.outages, 1)
        router = a.router
        three = FakeSession(3)
        self.assertIs(self.successResultOf(router.register(three)), False)
        router.attach(three)
        self.assertIsNone(self.successResultOf(router.fetch(elsewhere.session_id)))
        self.assertIs(self.successResultOf(router.take(FakeSession(5, session_id=elsewhere
                                                                   .session_id))), False)
        self.assertIsNone(self.successResultOf(router.token_uid(elsewhere.token)))
        self.assertIs(self.successResultOf(router.use_nonce(elsewhere.session_id, b"n")), True)
        router.detach(two)
        two.ended = True
        expired = router.release(two, True)
        self.assertNoResult(expired)
        router.detach(bye)
        bye.ended = True
        self.assertIs(self.successResultOf(router.release(bye, True, connected=True)), True)
        router.forward([(5, 1, b"x")])
        router.forward_lists([5])
        self.successResultOf(router._refresh_now())
        self.assertEqual(a.rejoined, 1)

        await self.server.restart()
        await self.rejoined(a)
        await self.rejoined(b)
        self.assertIs(self.successResultOf(expired), True)
        self.assertEqual(await self.owner(1), b"a " + one.sid)
        self.assertEqual(await self.owner(3), b"a " + three.sid)
        self.assertEqual(await self.owner(5), b"b " + elsewhere.sid)
        self.assertIsNone(await self.owner(2))
        self.assertIsNone(await self.owner(4))
        self.assertEqual(await self.members("im58d:held:a"), {one.sid, three.sid})
        self.assertEqual(await b.router.token_uid(three.token), 3)
        self.assertIsNone(await b.router.token_uid(two.token))
        record = await b.router.fetch(one.session_id)
        assert record is not None
        self.assertEqual(record["key"], one.session_key)
        await a.router._refresh_now()
        self.assertEqual(a.router.iplist.servers, addresses("a", "b"))
        self.assertEqual(a.adopted, [])

    async def test_commands_in_flight_when_redis_dies(self) -> None:
        """Requests that were on their way when Redis died answer the local
        fallback (no RESUME, LOGIN or HTTP request waits for a reply that
        never comes)."""
        a = await self.node("a")
        b = await self.node("b")
        one, two, elsewhere = FakeSession(1), FakeSession(2), FakeSession(5)
        await a.login(one)
        await a.login(two)
        await b.login(elsewhere)
        router = a.router
        a.router.detach(two)
        two.ended = True
        pending: list[Deferred[Any]] = [
            router.register(FakeSession(3)),
            router.fetch(elsewhere.session_id),
            router.take(FakeSession(5, session_id=elsewhere.session_id)),
            router.token_uid(elsewhere.token),
            router.use_nonce(elsewhere.session_id, b"n"),
            router.release(two, True, connected=True),
        ]
        self.server.stop()  # SIGKILL, before the commands are even sent
        results: list[Any] = await gatherResults(pending)
        self.assertEqual(results, [False, None, False, None, True, True])
        await until(lambda: not router.up, what="router down")

    async def test_release_while_away_done_on_rejoin(self) -> None:
        """Sessions that ended while their node could not reach Redis (the
        others could) are removed from Redis when the node is back: the
        other nodes stop seeing them.  A BYE answers from the node's view
        at once; an expired linger when Redis says it was still the node's."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        one, two, three = FakeSession(1), FakeSession(2), FakeSession(3)
        for session in (one, two, three):
            await a.login(session)
        a.router.detach(two)
        two.ended = True
        in_flight = a.router.release(two, True, connected=True)
        await relay.cut()
        self.assertIs(await in_flight, True)
        await until(lambda: not a.router.up, what="node a cut off")
        a.router.detach(three)
        three.ended = True
        expired = a.router.release(three, True)
        self.assertNoResult(expired)
        # the deployment still sees them
        self.assertIsNotNone(await b.router.fetch(two.session_id))
        self.assertEqual(await b.router.token_uid(three.token), 3)
        await relay.listen()
        await self.rejoined(a)
        self.assertIs(self.successResultOf(expired), True)
        self.assertIsNone(await b.router.fetch(two.session_id))
        self.assertIsNone(await b.router.fetch(three.session_id))
        self.assertIsNone(await b.router.token_uid(three.token))
        self.assertIsNone(await self.owner(2))
        self.assertIsNone(await self.owner(3))
        self.assertEqual(await self.owner(1), b"a " + one.sid)
        self.assertEqual(await self.members("im58d:held:a"), {one.sid})
        self.assertEqual(a.gone, [])

    async def test_newer_login_elsewhere_wins_on_rejoin(self) -> None:
        """The user logged in on node b while node a, which held their
        session, was cut off from Redis: when node a is back it ends its
        older session quietly (replaced), node b's stays."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        old = FakeSession(1, started=T0)
        await a.login(old)
        await self.cut_off(a, relay)
        new = FakeSession(1, started=T0 + 10)
        self.assertIs(await b.login(new), True)
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(a.gone, [(old.session_id, None, True)])
        self.assertEqual(await self.owner(1), b"b " + new.sid)
        self.assertEqual(await self.redis("EXISTS", f"im58d:session:{old.sid.decode()}"), 0)
        await self.barrier(b)
        self.assertEqual(b.gone, [])

    async def test_login_while_away_displaces_older_session(self) -> None:
        """The user logged in on node a while a was cut off from Redis, and
        had an older session on node b: when node a is back its newer
        session stays, and node b ends the older one quietly (replaced)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        old = FakeSession(1, started=T0)
        await b.login(old)
        await self.cut_off(a, relay)
        new = FakeSession(1, started=T0 + 10)
        self.assertIs(self.successResultOf(a.router.register(new)), False)
        a.router.attach(new)
        await relay.listen()
        await self.rejoined(a)
        await until(lambda: b.gone, what="node b told")
        self.assertEqual(b.gone, [(old.session_id, None, True)])
        self.assertEqual(await self.owner(1), b"a " + new.sid)
        self.assertEqual(await self.members("im58d:held:b"), set())
        self.assertEqual(a.gone, [])

    async def test_rejoin_takes_back_adopted_sessions(self) -> None:
        """Node a was cut off long enough for node b to adopt its sessions;
        its clients stayed connected to a: when a is back it holds them
        again (messages from other nodes reach them) and b drops its
        lingering copies."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        session = FakeSession(1)
        await a.login(session)
        session.connection = object()  # the client stays connected to node a
        await self.cut_off(a, relay)
        await self.expire("a")
        await b.router._refresh_now()
        self.assertEqual([[r["session_id"] for r in rs] for rs in b.adopted],
                         [[session.session_id]])
        self.assertEqual(b.router.iplist.servers, addresses("b"))
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(await self.owner(1), b"a " + session.sid)
        self.assertEqual(session.gen, 1)  # adoption moves no gen, the take back does
        await until(lambda: b.gone, what="node b told")
        self.assertEqual(b.gone, [(session.session_id, 1, False)])
        await b.router._refresh_now()
        self.assertEqual(b.router.iplist.servers, addresses("a", "b"))
        b.router.forward([(1, 3, b"hi")])
        await until(lambda: a.packets, what="packets delivered")
        self.assertEqual(a.packets, [[[1, 3, b"hi"]]])

    async def test_client_that_moved_while_away_stays(self) -> None:
        """Node a was cut off from Redis; its client's connection dropped
        and the client resumed on node b: when a is back it drops its stale
        copy (the client is on b), it does not take the session back (that
        would cut the client off b, which is told MOVED)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        session = FakeSession(1)
        await a.login(session)
        await self.cut_off(a, relay)
        await self.resumed_on(b, session)
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(await self.owner(1), b"b " + session.sid)
        await until(lambda: a.gone, 5, "node a dropping its copy")
        self.assertEqual([g[0] for g in a.gone], [session.session_id])
        # a publication of a's after any MOVED: b has heard all a said
        a.router.forward([(1, 9, b"marker")])
        await until(lambda: b.packets, what="marker delivered")
        self.assertEqual(b.gone, [])

    async def test_linger_over_after_client_moved_tells_nobody(self) -> None:
        """Node a was cut off; its client resumed on node b, and a's copy's
        linger ran out before a was back: a's release answers only after
        the rejoin, and answers that it was no longer the user's session
        (node b has it: no PRESENCE false for a user who is online)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        session = FakeSession(1)
        await a.login(session)
        await self.cut_off(a, relay)
        await self.resumed_on(b, session)
        a.router.detach(session)
        session.ended = True
        expired = a.router.release(session, True)
        self.assertNoResult(expired)
        await relay.listen()
        await self.rejoined(a)
        self.assertIs(self.successResultOf(expired), False)
        self.assertEqual(await self.owner(1), b"b " + session.sid)
        self.assertEqual(await b.router.token_uid(session.token), 1)

    async def test_half_open_connection_does_not_take_a_moved_session_back(self) -> None:
        """Node a was cut off; its client resumed on node b, but a still
        thinks the old connection is there (half-open): when a is back the
        take on b (a newer gen) wins, a drops its copy, b keeps the session."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        session = FakeSession(1)
        await a.login(session)
        session.connection = object()
        await self.cut_off(a, relay)
        await self.resumed_on(b, session)
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(await self.owner(1), b"b " + session.sid)
        self.assertEqual(a.gone, [(session.session_id, None, False)])
        await self.barrier(a)
        await self.barrier(b)
        self.assertEqual(b.gone, [])

    async def test_bye_while_away_ends_an_adopted_copy(self) -> None:
        """A BYE on node a while a was cut off (its friends were told at
        once), then a's entry expired and node b adopted the session: when
        a is back the session is removed all the same and b drops its copy
        quietly (no second PRESENCE false, no RESUME of a session that said
        BYE)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        session = FakeSession(1)
        await a.login(session)
        await self.cut_off(a, relay)
        a.router.detach(session)
        session.ended = True
        self.assertIs(self.successResultOf(a.router.release(session, True, connected=True)),
                      True)
        await self.expire("a")
        await b.router._refresh_now()
        self.assertEqual(len(b.adopted), 1)
        await relay.listen()
        await self.rejoined(a)
        await until(lambda: b.gone, what="node b told")
        self.assertEqual(b.gone, [(session.session_id, None, True)])
        self.assertIsNone(await self.owner(1))
        self.assertIsNone(await b.router.fetch(session.session_id))
        self.assertIsNone(await b.router.token_uid(session.token))

    async def test_sessions_ended_elsewhere_while_away(self) -> None:
        """Node a was cut off longer than node_ttl + linger: node b adopted
        its sessions and ended them (telling the friends).  When a is back,
        a session whose client is still connected to a is recorded again
        and its friends told it is online; a lingering one ends quietly."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        here, lingering = FakeSession(1), FakeSession(2)
        await a.login(here)
        await a.login(lingering)
        here.connection = object()
        await self.cut_off(a, relay)
        await self.expire("a")
        await b.router._refresh_now()
        for record in b.adopted[0]:
            copy = b.router.session_by_id(record["session_id"])
            b.router.detach(copy)
            self.assertIs(await b.router.release(copy, True), True)
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(a.revived, [here])
        self.assertEqual(a.gone, [(lingering.session_id, None, False)])
        self.assertEqual(await self.owner(1), b"a " + here.sid)
        self.assertIsNone(await self.owner(2))
        self.assertEqual(await b.router.token_uid(here.token), 1)

    async def test_gen_survives_lost_data(self) -> None:
        """Redis restarted empty: a node records its sessions with the gen
        they had, so that a later take elsewhere still outranks the copy."""
        a = await self.node("a")
        b = await self.node("b")
        session = FakeSession(1, gen=5)
        await a.login(session)
        await self.server.restart()
        await self.rejoined(a)
        await self.rejoined(b)
        record = await b.router.fetch(session.session_id)
        assert record is not None
        self.assertEqual(record["gen"], 5)
        copy = await self.resumed_on(b, session)
        self.assertEqual(copy.gen, 6)
        await until(lambda: a.gone, what="node a told")
        self.assertEqual(a.gone, [(session.session_id, 6, False)])

    async def test_presence_for_other_nodes_waits_for_redis(self) -> None:
        """PRESENCE and ACK_N frames for users on other nodes, made while
        Redis was away, go out when it is back (MSG_Ns are not kept: the
        other node catches them up from the store)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        await b.login(FakeSession(5))
        await self.cut_off(a, relay)
        a.router.forward([(5, 0, b"presence"), (5, 7, b"msg_n")])
        await relay.listen()
        await self.rejoined(a)
        await until(lambda: b.packets, what="frames delivered")
        self.assertEqual(b.packets, [[[5, 0, b"presence"]]])

    async def test_redis_hangs(self) -> None:
        """Redis stops answering (frozen, or a network that drops packets):
        a request waits at most the reply timeout, then answers the local
        fallback; the node counts Redis as down, and rejoins by itself when
        Redis answers again."""
        a = await self.node("a")
        session = FakeSession(1)
        await a.login(session)
        self.signal_server(signal.SIGSTOP)
        self.addCleanup(self.signal_server, signal.SIGCONT)
        started = reactor.seconds()
        self.assertIsNone(await a.router.fetch(session.session_id))
        self.assertLess(reactor.seconds() - started, 8)
        await until(lambda: not a.router.up, what="node a down")
        self.signal_server(signal.SIGCONT)
        await self.rejoined(a)
        self.assertEqual(await a.router.token_uid(session.token), 1)

    async def test_silently_dropped_subscription_recovers(self) -> None:
        """Redis dropped node a's subscription while a's side of the
        connection looks open (a firewall or NAT dropped an idle pub/sub
        connection: nothing ever comes on it again).  The node must notice
        within a few of its refreshes and subscribe again; otherwise pushes
        from other nodes to its users never come (they wait for a pull)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        await a.login(FakeSession(1))
        relay.subscriber().orphan()
        while int((await self.redis("PUBSUB", "NUMSUB", "im58d:to:a"))[1]):
            await deferLater(reactor, 0.01)
        interval = max(1.0, a.router.node_ttl / 3)
        deadline = reactor.seconds() + 12
        seq = 0
        while not a.packets and reactor.seconds() < deadline:
            a.clock.advance(interval)  # the refresh timer fires
            seq += 1
            b.router.forward([(1, seq, b"ping")])
            await deferLater(reactor, 0.2)
        self.assertTrue(a.packets, "node a never heard from Redis again")
