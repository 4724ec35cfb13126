"""``RedisRouter`` against a real ``redis-server``: the node registry (IP
list, adoption of a dead node's devices), where each user's online devices
are (register, move, release), delivery to other nodes by pub/sub, and what
a node does while Redis is away and when it is back.

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

from im58d.logic import packets as L
from im58d.logic.sessions import User
from im58d.routing.iplist import AccessServer, IPList
from im58d.routing.redis import RedisRouter

from .e2e import until
from .redis_server import HOST, SKIP, RedisServer, Relay

# seconds to wait for a node to (re)join: reconnect backoff is at most 5 s
REJOIN = 20.0

SERVERS = {
    "a": [AccessServer("10.0.0.1", 5222, False, 3)],
    "b": [AccessServer("10.0.0.2", 5222, True, 1), AccessServer("10.0.0.2", 443, True, 2)],
    "c": [AccessServer("10.0.0.3", 5222, False, 1)],
}


class FakeDevice:
    """What the router reads of a device (``im58d.logic.sessions.Device``)."""

    def __init__(
        self,
        uid: int,
        *,
        name: str = "phone",
        client: str | None = "app/1.0",
        session_id: bytes | None = None,
        gen: int = 0,
        record: dict[str, Any] | None = None,
    ) -> None:
        self.uid = uid
        self.user: Any = None
        self.session_id = session_id or os.urandom(16)
        self.key = os.urandom(32)
        self.token = base64.urlsafe_b64encode(os.urandom(24)).decode("ascii")
        self.device = uid * 100 + 1
        self.device_id = os.urandom(16)
        self.name = name
        self.client = client
        self.nonce = (7).to_bytes(8, "big")
        self.acked_max = 3
        self.gen = gen
        self.ended = False
        # the client's connection to this node (None: lingering)
        self.connection: Any = None
        if record is not None:
            for key in ("key", "token", "device", "device_id", "name", "client", "nonce",
                        "gen"):
                setattr(self, key, record[key])
            self.acked_max = record["acked"]

    @property
    def sid(self) -> bytes:
        """The SID as Redis spells it."""
        return self.session_id.hex().encode()


class Node:
    """A router with recorders for its handlers.  Adopted devices are kept
    in the router, as ``SessionManager.adopt`` does."""

    def __init__(self, router: RedisRouter, clock: Clock) -> None:
        self.router = router
        self.clock = clock
        self.packets: list[list[Any]] = []
        self.lists: list[list[int]] = []
        self.gone: list[tuple[bytes, int | None]] = []
        self.ended: list[tuple[bytes, int]] = []
        self.adopted: list[list[dict[str, Any]]] = []
        self.revived: list[Any] = []
        self.rejoined = 0
        self.fresh = 0
        self.stopped = False
        router.on_packets = self.packets.append
        router.on_lists = self.lists.append
        router.on_gone = self._gone
        router.on_ended = lambda sid, reason: self.ended.append((sid, reason))
        router.on_adopt = self._adopt
        router.on_revived = self.revived.append
        router.on_rejoined = self._rejoined
        router.on_fresh = self._fresh

    def _gone(self, sid: bytes, gen: int | None) -> None:
        self.gone.append((sid, gen))
        device = self.router.device_by_id(sid)
        if device is not None:
            self.router.detach(device)

    def _adopt(self, records: list[dict[str, Any]]) -> None:
        self.adopted.append(records)
        for record in records:
            device = FakeDevice(record["uid"], session_id=record["session_id"], record=record)
            self._attach(device)

    def _rejoined(self) -> None:
        self.rejoined += 1

    def _fresh(self) -> None:
        self.fresh += 1

    @property
    def joined(self) -> bool:
        """Up, and done recording what it has (the join is over)."""
        return self.router.up and self.router._joining is None

    def _attach(self, device: FakeDevice) -> bool:
        device.user = self.router.user(device.uid) or User(device.uid)
        return self.router.attach(device)

    async def online(self, device: FakeDevice) -> tuple[bool, bool]:
        """As ``SessionManager._come_online``: attach, then register."""
        first = self._attach(device)
        answer: tuple[bool, bool] = await self.router.register(device, first)
        return answer

    def offline(self, device: FakeDevice, connected: bool = False) -> Deferred[bool]:
        """As ``SessionManager._leave``: detach, then release; whether it was
        the user's last device (``release_here`` for both answers)."""
        return self.release_here(device, connected).addCallback(lambda answer: answer[1])

    def release_here(self, device: FakeDevice, connected: bool = False
                     ) -> Deferred[tuple[bool, bool]]:
        last = self.router.detach(device)
        device.user = None
        return self.router.release(device, last, connected)

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
            L.CODE, node_ttl=node_ttl, node=name,
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

    async def where(self, uid: int) -> set[bytes]:
        """``{b"SID@NODE", ...}``: where Redis says the user's devices are."""
        value: bytes | None = await self.redis("HGET", "im58d:users", uid)
        return set(value.split()) if value else set()

    async def members(self, key: str) -> set[bytes]:
        return set(await self.redis("SMEMBERS", key))

    async def barrier(self, node: Node) -> None:
        """Whatever ``node`` sent Redis before has been answered and handled
        (replies come in order on its one connection)."""
        await node.router._call("PING")


def at(device: FakeDevice, node: str) -> bytes:
    return device.sid + b"@" + node.encode()


def held(device: FakeDevice) -> bytes:
    return f"{device.uid} ".encode() + device.sid


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


class DeviceTests(RedisRouterTestCase):
    async def test_first_device_anywhere(self) -> None:
        """A user's first device online anywhere is the first (the friends
        are told); a second device on another node is not, and is not a
        device that was online before either; Redis lists both, each with
        its node."""
        a = await self.node("a")
        b = await self.node("b")
        phone, laptop = FakeDevice(7), FakeDevice(7, name="laptop")
        self.assertEqual(await a.online(phone), (True, True))
        self.assertEqual(await b.online(laptop), (False, True))
        self.assertEqual(await self.where(7), {at(phone, "a"), at(laptop, "b")})
        self.assertEqual(await self.members("im58d:held:a"), {held(phone)})
        self.assertEqual(await self.members("im58d:held:b"), {held(laptop)})
        await self.barrier(a)
        self.assertEqual(a.gone, [])

    async def test_resume_elsewhere_moves_the_device(self) -> None:
        """A device online on node a that resumes on node b moves there: it
        was online (no PRESENCE, no ONLINE), its gen moves on, and node a is
        told to drop its copy quietly."""
        a = await self.node("a")
        b = await self.node("b")
        phone = FakeDevice(11)
        await a.online(phone)
        copy = FakeDevice(11, session_id=phone.session_id)
        self.assertEqual(await b.online(copy), (False, False))
        self.assertEqual(copy.gen, 1)
        await until(lambda: a.gone, what="node a told")
        self.assertEqual(a.gone, [(phone.session_id, 1)])
        self.assertEqual(await self.where(11), {at(phone, "b")})
        self.assertEqual(await self.members("im58d:held:b"), {held(phone)})
        self.assertEqual(await self.members("im58d:held:a"), set())
        self.assertEqual(
            await self.redis("HGET", f"im58d:session:{phone.sid.decode()}", "node"), b"b")

    async def test_register_again_on_same_node_publishes_nothing(self) -> None:
        """A device recorded again on its own node (after an outage, or a
        RESUME of a lingering device) moves nothing and publishes nothing."""
        a = await self.node("a")
        phone = FakeDevice(8)
        await a.online(phone)
        published = a.router.published
        self.assertEqual(await a.router.register(phone, False), (False, False))
        self.assertEqual(a.router.published, published)
        self.assertEqual(phone.gen, 0)
        self.assertEqual(await self.where(8), {at(phone, "a")})

    async def test_release_last_device_anywhere(self) -> None:
        """Only the release of the user's last device online anywhere says
        so (exactly one PRESENCE false); Redis forgets the device and its
        copy of the session."""
        a = await self.node("a")
        b = await self.node("b")
        phone, laptop = FakeDevice(15), FakeDevice(15)
        await a.online(phone)
        await b.online(laptop)
        self.assertIs(await a.offline(phone), False)
        self.assertEqual(await self.where(15), {at(laptop, "b")})
        self.assertEqual(await self.redis("EXISTS", f"im58d:session:{phone.sid.decode()}"), 0)
        self.assertIs(await b.offline(laptop), True)
        self.assertEqual(await self.where(15), set())
        self.assertEqual(await self.redis("HEXISTS", "im58d:users", 15), 0)
        self.assertEqual(await self.members("im58d:held:a"), set())
        self.assertEqual(await self.members("im58d:held:b"), set())

    async def test_release_of_a_stale_copy_after_a_move(self) -> None:
        """After the device moved to node b, node a taking its stale copy
        offline (its linger ran out before the MOVED came) hears that the
        device is not its own (it leaves the store's record online) and not
        the user's last, and leaves b's record alone."""
        a = await self.node("a")
        b = await self.node("b")
        phone = FakeDevice(16)
        await a.online(phone)
        copy = FakeDevice(16, session_id=phone.session_id)
        await b.online(copy)
        self.assertEqual(await a.release_here(phone), (False, False))
        self.assertEqual(await self.where(16), {at(copy, "b")})
        self.assertEqual(
            await self.redis("HGET", f"im58d:session:{phone.sid.decode()}", "node"), b"b")
        self.assertIs(await b.offline(copy), True)

    async def test_online_among_across_nodes(self) -> None:
        """ONLINE after WELCOME lists the friends online on any node."""
        a = await self.node("a")
        b = await self.node("b")
        await a.online(FakeDevice(1))
        await b.online(FakeDevice(2))
        self.assertEqual(await a.router.online_among([1, 2, 3]), [1, 2])
        self.assertEqual(await b.router.online_among([3]), [])
        self.assertEqual(await b.router.online_among([]), [])

    async def test_end_elsewhere_reaches_the_holder(self) -> None:
        """A session ended on one node (signed out, evicted) whose device is
        online on another: that node is told, with the KICKED reason; a
        session no node holds publishes nothing."""
        a = await self.node("a")
        b = await self.node("b")
        phone = FakeDevice(3)
        await b.online(phone)
        published = a.router.published
        a.router.end_elsewhere([phone.session_id, os.urandom(16)], L.SIGNED_OUT)
        await until(lambda: b.ended, what="node b told")
        self.assertEqual(b.ended, [(phone.session_id, L.SIGNED_OUT)])
        self.assertEqual(a.router.published, published + 1)

    async def test_session_copy_in_redis(self) -> None:
        """Redis keeps a copy of an online device's session record, as the
        node made it (what a node that adopts the device needs), until the
        device goes offline."""
        a = await self.node("a")
        phone = FakeDevice(9, name="Pixel 8 — ünï", client=None)
        await a.online(phone)
        values = await self.redis("HGETALL", f"im58d:session:{phone.sid.decode()}")
        record = dict(zip(values[::2], values[1::2], strict=True))
        self.assertEqual(record[b"key"], phone.key)
        self.assertEqual(record[b"token"], phone.token.encode())
        self.assertEqual(record[b"device_id"], phone.device_id)
        self.assertEqual(record[b"name"].decode(), "Pixel 8 — ünï")
        self.assertEqual(record[b"client"], b"")
        self.assertEqual(record[b"node"], b"a")
        await a.offline(phone)
        self.assertEqual(await self.redis("EXISTS", f"im58d:session:{phone.sid.decode()}"), 0)


class ForwardTests(RedisRouterTestCase):
    async def test_packets_reach_every_node_with_devices_of_the_user(self) -> None:
        """Packets for users with devices on other nodes reach each of those
        nodes, one publication per node and batch, as ``(uid, seq, code,
        fields, skip)`` with bytes intact; not the sending node, not nodes
        without devices of the user."""
        a = await self.node("a")
        b = await self.node("b")
        c = await self.node("c")
        sender = FakeDevice(1)
        await b.online(sender)
        await c.online(FakeDevice(1))
        await b.online(FakeDevice(2))
        await a.online(FakeDevice(4))
        published = a.router.published
        a.router.forward([
            (1, 5, L.MsgN(5, 9, 4, b"\xff\x00", 1800000000), None),
            (2, 0, L.Presence(4, True), None),
            (4, 8, L.MsgN(8, 9, 4, "mine", 1800000000), None),
            (99, 9, L.AckN(3), None),
            (1, 6, L.MsgN(6, 10, 1, "copy", 1800000000, None, 2), sender.session_id),
        ])
        await until(lambda: b.packets and c.packets, what="packets delivered")
        self.assertEqual(b.packets, [[
            [1, 5, 0x12, [5, 9, 4, b"\xff\x00", 1800000000, None, None], None],
            [2, 0, 0x20, [4, True], None],
            [1, 6, 0x12, [6, 10, 1, "copy", 1800000000, None, 2], sender.session_id],
        ]])
        self.assertEqual(c.packets, [[
            [1, 5, 0x12, [5, 9, 4, b"\xff\x00", 1800000000, None, None], None],
            [1, 6, 0x12, [6, 10, 1, "copy", 1800000000, None, 2], sender.session_id],
        ]])
        self.assertEqual(a.router.published, published + 2)
        self.assertEqual(a.packets, [])

    async def test_packets_for_nobody_go_nowhere(self) -> None:
        """Packets for users with no device online elsewhere (offline: the
        store has the messages) publish nothing."""
        a = await self.node("a")
        b = await self.node("b")
        await a.online(FakeDevice(4))
        published = a.router.published
        a.router.forward([(98, 1, L.AckN(1), None), (4, 3, L.AckN(2), None)])
        a.router.forward_lists([98, 4])
        a.router.forward([])
        a.router.forward_lists([])
        await self.barrier(a)
        self.assertEqual(a.router.published, published)
        await self.barrier(b)
        self.assertEqual(b.packets, [])
        self.assertEqual(b.lists, [])

    async def test_lists_reach_every_node_of_each_user(self) -> None:
        """A change of users' lists reaches every other node with devices of
        those users, each node the uids it holds, in one publication."""
        a = await self.node("a")
        b = await self.node("b")
        c = await self.node("c")
        await b.online(FakeDevice(1))
        await b.online(FakeDevice(2))
        await c.online(FakeDevice(3))
        await c.online(FakeDevice(1))
        a.router.forward_lists([1, 2, 3, 99])
        await until(lambda: b.lists and c.lists, what="lists delivered")
        self.assertEqual(b.lists, [[1, 2]])
        self.assertEqual(sorted(c.lists[0]), [1, 3])


class AdoptionTests(RedisRouterTestCase):
    async def test_crashed_node_devices_adopted(self) -> None:
        """A node that dies (no goodbye): once its entry expired, the next
        node to refresh adopts its online devices (they linger there, so
        their clients can resume, and go offline there if they do not),
        with their session records; a RESUME on a third node moves them on."""
        a = await self.node("a")
        b = await self.node("b")
        one, two, gone = FakeDevice(1, client=None), FakeDevice(2), FakeDevice(3)
        for device in (one, two, gone):
            await a.online(device)
        await a.offline(gone)
        await a.crash()
        await self.expire("a")
        await b.router._refresh_now()
        self.assertEqual(len(b.adopted), 1)
        records = sorted(b.adopted[0], key=lambda r: r["uid"])
        self.assertEqual([r["session_id"] for r in records], [one.session_id, two.session_id])
        self.assertEqual(records[0], {
            "session_id": one.session_id, "uid": 1, "key": one.key, "token": one.token,
            "device": one.device, "device_id": one.device_id, "name": "phone", "client": None,
            "nonce": one.nonce, "acked": 3, "gen": 0,
        })
        self.assertEqual(await self.where(1), {at(one, "b")})
        self.assertEqual(await self.where(2), {at(two, "b")})
        self.assertEqual(await self.members("im58d:held:b"), {held(one), held(two)})
        self.assertEqual(await self.members("im58d:nodes"), {b"b"})
        self.assertEqual(await self.redis("EXISTS", "im58d:held:a"), 0)
        self.assertEqual(b.router.iplist.servers, addresses("b"))
        # adopted once only
        await b.router._refresh_now()
        self.assertEqual(len(b.adopted), 1)
        # the adopted copy registered again on b (SessionManager.adopt does)
        self.assertEqual(await b.router.register(b.router.device_by_id(one.session_id), False),
                         (False, False))
        # a RESUME on node c finds node b holding it
        c = await self.node("c")
        copy = FakeDevice(1, session_id=one.session_id)
        self.assertEqual(await c.online(copy), (False, False))
        await until(lambda: b.gone, what="node b told")
        self.assertEqual(b.gone, [(one.session_id, 1)])

    async def test_stopped_node_devices_adopted_at_once(self) -> None:
        """A node that stops cleanly leaves the registry at once: the next
        refresh of another node adopts its devices, without waiting for its
        entry to expire."""
        a = await self.node("a")
        b = await self.node("b")
        phone = FakeDevice(1)
        await a.online(phone)
        await a.stop()
        await b.router._refresh_now()
        self.assertEqual([[r["session_id"] for r in records] for records in b.adopted],
                         [[phone.session_id]])
        self.assertEqual(await self.where(1), {at(phone, "b")})
        self.assertEqual(b.router.device_by_id(phone.session_id).uid, 1)

    async def test_exactly_one_node_adopts(self) -> None:
        """Of the nodes that survive a dead node, exactly one adopts each of
        its devices, even when they refresh at the same moment (one
        lingering copy, one PRESENCE false when it goes offline)."""
        a = await self.node("a")
        b = await self.node("b")
        c = await self.node("c")
        devices = [FakeDevice(uid) for uid in (1, 2, 3)]
        for device in devices:
            await a.online(device)
        await a.crash()
        await self.expire("a")
        await gatherResults([b.router._refresh_now(), c.router._refresh_now()])
        adopters = [n for n in (b, c) if n.adopted]
        self.assertEqual(len(adopters), 1)
        adopter = adopters[0]
        self.assertEqual(len(adopter.adopted), 1)
        self.assertEqual({r["session_id"] for r in adopter.adopted[0]},
                         {d.session_id for d in devices})
        for device in devices:
            self.assertEqual(await self.where(device.uid), {at(device, adopter.router.node)})
        await gatherResults([b.router._refresh_now(), c.router._refresh_now()])
        self.assertEqual(len(b.adopted) + len(c.adopted), 1)

    async def test_slow_node_takes_its_devices_back(self) -> None:
        """A node that was only slow (its refreshes stopped for longer than
        node_ttl, its connections stayed up) and whose devices another node
        adopted meanwhile: at its next refresh it holds its connected
        devices again, so that messages from other nodes reach them, and the
        adopter drops its copies (otherwise the adopter's copy lingers, goes
        offline, and the friends see the user, still connected, go offline)."""
        a = await self.node("a")
        b = await self.node("b")
        phone = FakeDevice(1)
        await a.online(phone)
        phone.connection = object()  # the client stays connected to node a
        await self.redis("DEL", "im58d:node:a")  # as if it expired
        await b.router._refresh_now()
        self.assertEqual(len(b.adopted), 1)
        await a.router._refresh_now()  # a's next refresh
        await until(lambda: a.joined, what="node a done")
        self.assertEqual(await self.where(1), {at(phone, "a")})
        await until(lambda: b.gone, 5, "node b told")
        self.assertEqual([g[0] for g in b.gone], [phone.session_id])

    async def test_first_node_of_a_fresh_redis_restores(self) -> None:
        """The first node to join an empty Redis (a deployment starting, or
        Redis restarted without its data) keeps the devices the store says
        were online (``on_fresh``); the nodes that join after it do not."""
        a = await self.node("a")
        b = await self.node("b")
        self.assertEqual((a.fresh, b.fresh), (1, 0))
        await self.server.restart()
        await self.rejoined(a)
        await self.rejoined(b)
        self.assertEqual(a.fresh + b.fresh, 2)


    async def test_restored_device_leaves_one_held_elsewhere(self) -> None:
        """The first node of a fresh Redis restores the devices the store
        says were online; one that another node has recorded meanwhile (its
        client is connected there) stays there: the restoring node drops
        its copy quietly, tells nobody (no PRESENCE, no KICKED), and the
        holder is not told to give it up."""
        a = await self.node("a")
        b = await self.node("b")
        phone = FakeDevice(4)
        await b.online(phone)
        copy = FakeDevice(4, session_id=phone.session_id)
        a._attach(copy)
        a.router._restoring = True
        try:
            self.assertEqual(await a.router.register(copy, True), (False, False))
        finally:
            a.router._restoring = False
        self.assertEqual(await self.where(4), {at(phone, "b")})
        self.assertEqual(a.gone, [(phone.session_id, None)])
        self.assertIsNone(a.router.device_by_id(phone.session_id))
        await self.barrier(b)
        self.assertEqual(b.gone, [])


class OutageTests(RedisRouterTestCase):
    async def test_redis_down_falls_back_and_rejoins(self) -> None:
        """While Redis is down a node serves its own users: devices come
        online (recorded later; first from the node's own view), ONLINE
        lists the friends online here, a BYE answers from the node's own
        view, forwarding waits or is dropped; all at once, nothing hangs.
        Whether a lingering device that went offline was the user's last
        waits for Redis (its client may have resumed elsewhere).  When Redis
        is back (empty: it was restarted) the node rejoins by itself,
        records its devices again (not those that went offline meanwhile),
        answers what waited from its own view (an empty Redis knows of no
        other claim) and catches up."""
        a = await self.node("a")
        b = await self.node("b")
        one, two, elsewhere, bye = FakeDevice(1), FakeDevice(2), FakeDevice(5), FakeDevice(4)
        await a.online(one)
        await a.online(two)
        await a.online(bye)
        await b.online(elsewhere)
        await self.server.stop()
        await until(lambda: not a.router.up and not b.router.up, what="routers down")
        self.assertEqual(a.router.outages, 1)
        router = a.router
        three = FakeDevice(3)
        a._attach(three)
        self.assertEqual(self.successResultOf(router.register(three, True)), (True, True))
        self.assertEqual(self.successResultOf(router.online_among([1, 3, 5])), [1, 3])
        expired = a.offline(two)
        self.assertNoResult(expired)
        self.assertIs(self.successResultOf(a.offline(bye, connected=True)), True)
        router.forward([(5, 1, L.AckN(1), None)])
        router.forward_lists([5])
        self.successResultOf(router._refresh_now())
        self.assertEqual(a.rejoined, 1)

        await self.server.restart()
        await self.rejoined(a)
        await self.rejoined(b)
        self.assertIs(self.successResultOf(expired), True)
        self.assertEqual(await self.where(1), {at(one, "a")})
        self.assertEqual(await self.where(3), {at(three, "a")})
        self.assertEqual(await self.where(5), {at(elsewhere, "b")})
        self.assertEqual(await self.where(2), set())
        self.assertEqual(await self.where(4), set())
        self.assertEqual(await self.members("im58d:held:a"), {held(one), held(three)})
        await a.router._refresh_now()
        self.assertEqual(a.router.iplist.servers, addresses("a", "b"))
        self.assertEqual(a.adopted, [])

    async def test_commands_in_flight_when_redis_dies(self) -> None:
        """Requests that were on their way when Redis died answer the local
        fallback (no LOGIN, RESUME or ONLINE waits for a reply that never
        comes)."""
        a = await self.node("a")
        b = await self.node("b")
        one, two = FakeDevice(1), FakeDevice(2)
        await a.online(one)
        await a.online(two)
        await b.online(FakeDevice(5))
        router = a.router
        three = FakeDevice(3)
        first = a._attach(three)
        pending: list[Deferred[Any]] = [
            router.register(three, first),
            router.online_among([1, 5]),
            a.offline(two, connected=True),
        ]
        self.server.stop()  # SIGKILL, before the commands are even sent
        results: list[Any] = await gatherResults(pending)
        self.assertEqual(results, [(True, True), [1], True])
        await until(lambda: not router.up, what="router down")

    async def test_release_while_away_done_on_rejoin(self) -> None:
        """Devices that went offline while their node could not reach Redis
        (the others could) are removed from Redis when the node is back: the
        other nodes stop seeing them online.  A BYE answers from the node's
        view at once; an expired linger when Redis says whether it was the
        user's last device."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        one, two, three = FakeDevice(1), FakeDevice(2), FakeDevice(3)
        for device in (one, two, three):
            await a.online(device)
        in_flight = a.offline(two, connected=True)
        await relay.cut()
        self.assertIs(await in_flight, True)
        await until(lambda: not a.router.up, what="node a cut off")
        expired = a.offline(three)
        self.assertNoResult(expired)
        # the deployment still sees it online
        self.assertEqual(await b.router.online_among([3]), [3])
        await relay.listen()
        await self.rejoined(a)
        self.assertIs(self.successResultOf(expired), True)
        self.assertEqual(await b.router.online_among([1, 2, 3]), [1])
        self.assertEqual(await self.members("im58d:held:a"), {held(one)})
        self.assertEqual(a.gone, [])

    async def test_rejoin_takes_back_adopted_devices(self) -> None:
        """Node a was cut off long enough for node b to adopt its devices;
        its clients stayed connected to a: when a is back it holds them
        again (messages from other nodes reach them) and b drops its
        lingering copies."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        phone = FakeDevice(1)
        await a.online(phone)
        phone.connection = object()  # the client stays connected to node a
        await self.cut_off(a, relay)
        await self.expire("a")
        await b.router._refresh_now()
        self.assertEqual([[r["session_id"] for r in rs] for rs in b.adopted],
                         [[phone.session_id]])
        self.assertEqual(b.router.iplist.servers, addresses("b"))
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(await self.where(1), {at(phone, "a")})
        self.assertEqual(phone.gen, 1)  # adoption moves no gen, the take back does
        await until(lambda: b.gone, what="node b told")
        self.assertEqual(b.gone, [(phone.session_id, 1)])
        await b.router._refresh_now()
        self.assertEqual(b.router.iplist.servers, addresses("a", "b"))
        b.router.forward([(1, 3, L.AckN(3), None)])
        await until(lambda: a.packets, what="packets delivered")
        self.assertEqual(a.packets, [[[1, 3, 0x15, [3], None]]])

    async def test_client_that_moved_while_away_stays(self) -> None:
        """Node a was cut off from Redis; its client's connection dropped
        and the client resumed on node b: when a is back it drops its stale
        copy (the client is on b), it does not take the device back."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        phone = FakeDevice(1)
        await a.online(phone)
        await self.cut_off(a, relay)
        await b.online(FakeDevice(1, session_id=phone.session_id))
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(await self.where(1), {at(phone, "b")})
        await until(lambda: a.gone, 5, "node a dropping its copy")
        self.assertEqual([g[0] for g in a.gone], [phone.session_id])
        self.assertEqual(b.gone, [])

    async def test_linger_over_after_client_moved_tells_nobody(self) -> None:
        """Node a was cut off; its client resumed on node b, and a's copy's
        linger ran out before a was back: a's release answers only after
        the rejoin, and answers that it was not the user's last device
        (node b has it: no PRESENCE false for a user who is online)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        phone = FakeDevice(1)
        await a.online(phone)
        await self.cut_off(a, relay)
        await b.online(FakeDevice(1, session_id=phone.session_id))
        expired = a.release_here(phone)
        self.assertNoResult(expired)
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(self.successResultOf(expired), (False, False))
        self.assertEqual(await self.where(1), {at(phone, "b")})

    async def test_half_open_connection_does_not_take_a_moved_device_back(self) -> None:
        """Node a was cut off; its client resumed on node b, but a still
        thinks the old connection is there (half-open): when a is back the
        move to b (a newer gen) wins, a drops its copy, b keeps the device."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        phone = FakeDevice(1)
        await a.online(phone)
        phone.connection = object()
        await self.cut_off(a, relay)
        await b.online(FakeDevice(1, session_id=phone.session_id))
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(await self.where(1), {at(phone, "b")})
        self.assertEqual(a.gone, [(phone.session_id, None)])
        await self.barrier(a)
        await self.barrier(b)
        self.assertEqual(b.gone, [])

    async def test_bye_while_away_ends_an_adopted_copy(self) -> None:
        """A BYE on node a while a was cut off (its friends were told at
        once), then a's entry expired and node b adopted the device: when a
        is back the device is taken offline all the same and b drops its
        copy quietly (no second PRESENCE false)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        phone = FakeDevice(1)
        await a.online(phone)
        await self.cut_off(a, relay)
        self.assertIs(self.successResultOf(a.offline(phone, connected=True)), True)
        await self.expire("a")
        await b.router._refresh_now()
        self.assertEqual(len(b.adopted), 1)
        await relay.listen()
        await self.rejoined(a)
        await until(lambda: b.gone, what="node b told")
        self.assertEqual(b.gone, [(phone.session_id, None)])
        self.assertEqual(await self.where(1), set())

    async def test_devices_taken_offline_elsewhere_while_away(self) -> None:
        """Node a was cut off longer than node_ttl + linger: node b adopted
        its devices and took them offline (telling the friends).  When a is
        back, a device whose client is still connected to a is recorded
        again and the friends on other nodes told the user is online; a
        lingering one goes quietly."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        here, lingering = FakeDevice(1), FakeDevice(2)
        await a.online(here)
        await a.online(lingering)
        here.connection = object()
        await self.cut_off(a, relay)
        await self.expire("a")
        await b.router._refresh_now()
        for record in b.adopted[0]:
            copy = b.router.device_by_id(record["session_id"])
            self.assertIs(await b.offline(copy), True)
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(a.revived, [here.user])
        self.assertEqual(a.gone, [(lingering.session_id, None)])
        self.assertEqual(await self.where(1), {at(here, "a")})
        self.assertEqual(await self.where(2), set())

    async def test_device_online_while_away_told_elsewhere_on_rejoin(self) -> None:
        """A user's first device came online on node a while a was cut off:
        only the friends on a were told.  When a is back the friends on the
        other nodes are told (``on_revived``); a second device of a user
        already online elsewhere tells nobody."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        await b.online(FakeDevice(2))
        await self.cut_off(a, relay)
        new, second = FakeDevice(1), FakeDevice(2)
        new.connection = second.connection = object()
        a._attach(new)
        self.assertEqual(self.successResultOf(a.router.register(new, True)), (True, True))
        a._attach(second)
        self.successResultOf(a.router.register(second, True))
        await relay.listen()
        await self.rejoined(a)
        self.assertEqual(a.revived, [new.user])
        self.assertEqual(await self.where(1), {at(new, "a")})
        self.assertEqual(len(await self.where(2)), 2)

    async def test_kicks_for_other_nodes_wait_for_redis(self) -> None:
        """A session ended on node a while a was cut off (a sign-out over
        HTTP) whose device is online on node b: b is told when a is back."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        phone = FakeDevice(2)
        await b.online(phone)
        await self.cut_off(a, relay)
        a.router.end_elsewhere([phone.session_id], L.SIGNED_OUT)
        await relay.listen()
        await self.rejoined(a)
        await until(lambda: b.ended, what="node b told")
        self.assertEqual(b.ended, [(phone.session_id, L.SIGNED_OUT)])

    async def test_gen_survives_lost_data(self) -> None:
        """Redis restarted empty: a node records its devices with the gen
        they had, so that a later move elsewhere still outranks the copy."""
        a = await self.node("a")
        b = await self.node("b")
        phone = FakeDevice(1, gen=5)
        await a.online(phone)
        await self.server.restart()
        await self.rejoined(a)
        await self.rejoined(b)
        self.assertEqual(
            await self.redis("HGET", f"im58d:session:{phone.sid.decode()}", "gen"), b"5")
        copy = FakeDevice(1, session_id=phone.session_id)
        await b.online(copy)
        self.assertEqual(copy.gen, 6)
        await until(lambda: a.gone, what="node a told")
        self.assertEqual(a.gone, [(phone.session_id, 6)])

    async def test_presence_for_other_nodes_waits_for_redis(self) -> None:
        """PRESENCE and ACK_N for devices on other nodes, made while Redis
        was away, go out when it is back (MSG_Ns are not kept: the other
        node catches them up from the store)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        await b.online(FakeDevice(5))
        await self.cut_off(a, relay)
        a.router.forward([(5, 0, L.Presence(1, True), None),
                          (5, 7, L.MsgN(7, 1, 1, "x", 1800000000), None)])
        await relay.listen()
        await self.rejoined(a)
        await until(lambda: b.packets, what="notices delivered")
        self.assertEqual(b.packets, [[[5, 0, 0x20, [1, True], None]]])

    async def test_redis_hangs(self) -> None:
        """Redis stops answering (frozen, or a network that drops packets):
        a request waits at most the reply timeout, then answers the local
        fallback; the node counts Redis as down, and rejoins by itself when
        Redis answers again."""
        a = await self.node("a")
        await a.online(FakeDevice(1))
        self.signal_server(signal.SIGSTOP)
        self.addCleanup(self.signal_server, signal.SIGCONT)
        started = reactor.seconds()
        self.assertEqual(await a.router.online_among([1, 2]), [1])
        self.assertLess(reactor.seconds() - started, 8)
        await until(lambda: not a.router.up, what="node a down")
        self.signal_server(signal.SIGCONT)
        await self.rejoined(a)
        self.assertEqual(await a.router.online_among([1, 2]), [1])

    async def test_silently_dropped_subscription_recovers(self) -> None:
        """Redis dropped node a's subscription while a's side of the
        connection looks open (a firewall or NAT dropped an idle pub/sub
        connection: nothing ever comes on it again).  The node must notice
        within a few of its refreshes and subscribe again; otherwise pushes
        from other nodes to its users never come (they wait for a pull)."""
        a, relay = await self.relayed("a")
        b = await self.node("b")
        await a.online(FakeDevice(1))
        relay.subscriber().orphan()
        while int((await self.redis("PUBSUB", "NUMSUB", "im58d:to:a"))[1]):
            await deferLater(reactor, 0.01)
        interval = max(1.0, a.router.node_ttl / 3)
        deadline = reactor.seconds() + 12
        seq = 0
        while not a.packets and reactor.seconds() < deadline:
            a.clock.advance(interval)  # the refresh timer fires
            seq += 1
            b.router.forward([(1, seq, L.AckN(seq), None)])
            await deferLater(reactor, 0.2)
        self.assertTrue(a.packets, "node a never heard from Redis again")
