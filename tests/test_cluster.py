"""End to end: several real nodes (``twistd -n im58d``) behind one real
``redis-server``, sharing one SQLite database file (contract v2).

Each node has its own ports and its own config file (``[routing] backend =
redis``, a small ``node_ttl``, and a small ``[session] linger`` where a test
waits for an expiry).  Users' devices are SDK clients
(``im58d.client.Client``, one ``ClientState`` per device) that know every
node's access server, as they would from ``GET /v1/iplist``, and start on
the node a test puts them on (the last server they used); where a test
needs exact packets, or a session that does not come back, a device is a
bare wire client (``PacketClient``).  A user's devices may be on different
nodes.  Where one node must lose Redis while the others keep it, that node
reaches Redis through a ``Relay`` that the test cuts.
"""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from im58d.client import DELIVERED, STORED, Client, ClientState, Message, Outgoing
from im58d.wire import packets as P

from .e2e import Daemon, PacketClient, admin, connect, free_port, new_device, resume_for, until
from .redis_server import HOST, SKIP, RedisServer, Relay
from .test_shared_store import make_users

# seconds a node's registry entry lives: a killed node is dead after this
NODE_TTL = 3
# what in a node's output means something went wrong inside it
TROUBLE = (b"Traceback", b"Unhandled")


async def sleep(seconds: float) -> None:
    """Only where nothing can be awaited: to see that something does NOT
    happen (a second PRESENCE, say) within the time it would take."""
    await task.deferLater(reactor, seconds)


class User:
    """One device of a user, an SDK client, and what its app saw: messages
    shown, PRESENCE and ONLINE received, messages sent from it."""

    def __init__(self, name: str, uid: int) -> None:
        self.name = name
        self.uid = uid
        self.shown: list[Message] = []
        self.presence: list[tuple[int, bool]] = []
        self.online: list[tuple[int, ...]] = []
        self.lost: list[str] = []
        self.sent: list[Outgoing] = []
        self.client: Client

    def __repr__(self) -> str:
        return f"<{self.name} {self.client.device}>"

    def on_presence(self, uid: int, online: bool) -> None:
        self.presence.append((uid, online))

    def send(self, to: int, body: str, kind: int = P.KIND_USER) -> Outgoing:
        outgoing = self.client.send(to, body, kind)
        self.sent.append(outgoing)
        return outgoing

    def bodies_from(self, sender: User | int) -> list[str | bytes]:
        uid = sender if isinstance(sender, int) else sender.uid
        return [m.body for m in self.shown if m.sender == uid]

    def drop(self) -> None:
        """The phone's connection breaks (no BYE)."""
        wire = self.client._wire
        assert wire is not None, f"{self.name} has no connection"
        transport: Any = wire.transport
        transport.abortConnection()

    def hold(self) -> None:
        """The phone has no network: the client tries no reconnect until
        ``release``."""
        self.client._stopping = True

    def release(self) -> None:
        self.client._stopping = False
        self.client._connect()


class Cluster(TestCase):
    """A Redis server and a shared database; nodes started by each test."""

    skip = SKIP
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.database = os.path.join(self.base, "shared.sqlite")
        self.redis = RedisServer(os.path.join(self.base, "redis"))
        await self.redis.start()
        self.addCleanup(self.redis.stop)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.nodes: dict[str, Daemon] = {}
        self.weights: dict[str, int] = {}
        self._db: sqlite3.Connection | None = None

    # nodes

    async def start_nodes(self, *names: str, linger: int = 60,
                          weights: dict[str, int] | None = None,
                          redis: dict[str, str] | None = None,
                          node_ttl: int = NODE_TTL, converge: bool = True) -> None:
        """Start the nodes ``names`` (each on its own free ports, with its own
        config file) and wait until each has joined through Redis and (with
        ``converge``) every running node's IP list has every running node.
        ``redis`` gives a node another way to Redis (a ``Relay``)."""
        started = []
        for name in names:
            weight = (weights or {}).get(name, 1)
            endpoint = (redis or {}).get(name, self.redis.endpoint)
            config = os.path.join(self.base, f"{name}.ini")
            with open(config, "w") as f:
                f.write(
                    f"[routing]\nbackend = redis\nredis = {endpoint}\n"
                    f"node_ttl = {node_ttl}\nweight = {weight}\n"
                    f"[session]\nlinger = {linger}\n"
                )
            node = Daemon(os.path.join(self.base, name), extra=["--config", config])
            self.addCleanup(node.cleanup)
            self.nodes[name] = node
            self.weights[name] = weight
            started.append(node.start([
                "--database", self.database,
                "--access", f"tcp:{free_port()}:interface={HOST}",
                "--http", f"tcp:{free_port()}:interface={HOST}",
            ]))
        await gatherResults(started, consumeErrors=True)
        for name in names:
            node = self.nodes[name]
            await until(lambda node=node: b"joined through Redis" in node.output,
                        what=f"node {name} joining")
        if converge:
            await self.iplists_show(self.running(), timeout=node_ttl / 3 + 5)

    def running(self) -> list[str]:
        return [name for name, node in self.nodes.items() if node.running]

    def server(self, node: str) -> tuple[str, int, bool]:
        return (HOST, self.nodes[node].access_port, False)

    def url(self, node: str, path: str = "") -> str:
        return f"http://{HOST}:{self.nodes[node].http_port}{path}"

    def listed(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """The IP list's servers when the nodes ``names`` are alive."""
        return sorted(
            ({"host": HOST, "port": self.nodes[n].access_port, "tls": False,
              "weight": self.weights[n]} for n in names),
            key=lambda s: s["port"],
        )

    async def iplists_show(self, alive: Sequence[str], on: Sequence[str] | None = None,
                           timeout: float = 10) -> int:
        """Wait until ``GET /v1/iplist`` on each node of ``on`` (default:
        ``alive``) lists exactly the nodes ``alive``, with one version;
        return it."""
        expected = self.listed(alive)
        answers: dict[str, Any] = {}

        async def check() -> bool:
            for node in on or alive:
                answers[node] = await self.get(node, "/v1/iplist")
            return all(
                code == 200 and body["servers"] == expected for code, body in answers.values()
            ) and len({body["version"] for _, body in answers.values()}) == 1

        await poll(check, timeout, lambda: f"IP lists {answers}, expected {expected}")
        version: int = next(iter(answers.values()))[1]["version"]
        return version

    def assert_no_trouble(self) -> None:
        for name, node in self.nodes.items():
            for trouble in TROUBLE:
                self.assertNotIn(trouble, node.output,
                                 f"node {name}:\n{node.output.decode()}")

    def logs(self) -> str:
        return "".join(f"\nnode {name}:\n{node.output.decode()}"
                       for name, node in self.nodes.items())

    # the store

    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.database)
            self.addCleanup(self._db.close)
        return self._db

    def head(self, uid: int) -> tuple[int, int]:
        """The user's timeline head and cursor (``inboxes``)."""
        row = self.db().execute("SELECT max_seq, acked_seq FROM inboxes WHERE uid = ?",
                                (uid,)).fetchone()
        return int(row[0]), int(row[1])

    def cursor(self, user: User) -> int:
        """The device's ack cursor in the store."""
        row = self.db().execute("SELECT acked FROM device_cursors WHERE uid = ? AND device_id = ?",
                                (user.uid, user.client.state.device_id)).fetchone()
        return int(row[0])

    def assert_timeline(self, user: User) -> None:
        """The device has each entry of its user's timeline exactly once:
        shown, in seq order, or its own message (its MSG_A's seq, never
        shown)."""
        head, _ = self.head(user.uid)
        shown = [m.seq for m in user.shown]
        own = [o.seq for o in user.sent]
        self.assertEqual(shown, sorted(set(shown)), f"{user} showed out of order or twice")
        self.assertNotIn(None, own, f"{user}: a message without its MSG_A")
        self.assertEqual(sorted(shown + own), list(range(1, head + 1)),
                         f"{user}: timeline 1..{head}, shown {shown}, own {own}")
        self.assertEqual(user.lost, [], user)

    # HTTP

    async def get(self, node: str, path: str, token: str | None = None) -> tuple[int, Any]:
        headers: dict[bytes | str, bytes | str] = (
            {"Authorization": f"Bearer {token}"} if token else {}
        )
        response = await self.http.get(self.url(node, path), headers=headers)
        return response.code, await response.json()

    async def delete(self, node: str, path: str, token: str) -> int:
        headers: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {token}"}
        response = await self.http.delete(self.url(node, path), headers=headers)
        await response.content()
        return int(response.code)

    async def metric(self, node: str, name: str) -> float:
        """A value of the node's ``/metrics`` (loopback needs no token)."""
        response = await self.http.get(self.url(node, "/metrics"))
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in node {node}'s /metrics")

    async def assert_pushed_live(self) -> None:
        """No node had to catch a MSG_N up from the store: every push to a
        device on another node came by its publication at once (a catch-up
        round would deliver it too, up to 10 s late)."""
        for node in self.running():
            self.assertEqual(await self.metric(node, "im58d_caught_up_total"), 0, node)

    # clients

    def make_users(self, names: Sequence[str],
                   friends: Iterable[tuple[str, str]] = ()) -> dict[str, int]:
        return make_users(self.database, names, friends)

    def user(self, name: str, uid: int, node: str, http: str | None = None,
             device: str = "phone", **kwargs: Any) -> User:
        """A device of ``name`` (a new one: a ``ClientState`` of its own),
        an SDK client that starts on ``node`` (its last used server) and
        knows every running node's access server, so that it fails over to
        another one; its HTTP goes to ``http`` (default: ``node``)."""
        user = User(name, uid)
        state = ClientState(next_cmid=1)
        state.servers = [
            {"host": HOST, "port": self.nodes[n].access_port, "tls": False, "weight": 1}
            for n in self.running()
        ]
        state.last_server = self.server(node)
        kwargs.setdefault("min_backoff", 0.05)
        kwargs.setdefault("max_backoff", 0.5)
        user.client = Client(
            reactor, None, None, self.url(http or node), name, "pw", device=device,
            state=state, on_message=user.shown.append, on_presence=user.on_presence,
            on_online=user.online.append, on_session_lost=user.lost.append,
            http=self.http, **kwargs,
        )
        self.addCleanup(user.client.stop)
        return user

    async def login(self, node: str, name: str, device_id: bytes | None = None
                    ) -> tuple[PacketClient, P.Welcome, P.Online]:
        """A bare wire client that signs a device of ``name`` in on ``node``
        (a new device unless ``device_id`` is given): WELCOME, then ONLINE."""
        wire = await connect(self.nodes[node].access_port)
        self.addCleanup(close, wire)
        welcome, online = await wire.login(name, "pw", device_id, f"raw-{node}")
        return wire, welcome, online

    async def resume(self, node: str, welcome: P.Welcome) -> tuple[PacketClient, Any]:
        """A bare wire client that RESUMEs ``welcome``'s session on ``node``:
        the client and the answer."""
        wire = await connect(self.nodes[node].access_port)
        self.addCleanup(close, wire)
        wire.send(resume_for(welcome))
        return wire, await wire.next()


def b64(data: bytes) -> str:
    """Binary fields over HTTP: base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def close(wire: PacketClient) -> Any:
    if not wire.lost.called:
        transport: Any = wire.transport
        transport.abortConnection()
    return wire.lost


async def drop(wire: PacketClient) -> None:
    """The connection breaks without BYE."""
    wire.drop()
    await wire.lost


async def kicked(wire: PacketClient) -> P.Kicked:
    """The KICKED that ends the connection.  A CHANGED "devices" may come
    before it: the session's end moved the device list, and the node's
    housekeeping may notice that first."""
    while True:
        packet = await wire.next()
        if isinstance(packet, P.Kicked):
            return packet
        if not (isinstance(packet, P.Changed) and packet.what == "devices"):
            raise AssertionError(f"expected KICKED, got {packet!r}")


async def poll(check: Callable[[], Awaitable[bool]], timeout: float,
               describe: Callable[[], str]) -> None:
    """``until`` for a condition that needs a request to decide."""
    deadline = reactor.seconds() + timeout
    while not await check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out: {describe()}")
        await sleep(0.1)


def all_in(outgoing: Iterable[Outgoing], state: str) -> bool:
    return all(o.state == state for o in outgoing)


def all_stored(outgoing: Iterable[Outgoing]) -> bool:
    """Each has its MSG_A (it may be delivered already)."""
    return all(o.msg_id is not None for o in outgoing)


def recent(ts: int) -> bool:
    return abs(ts - time.time()) < 60


class MessagingTests(Cluster):
    async def test_messages_between_nodes(self) -> None:
        """Carol on node a sends dave on node b a message: the six packets of
        the contract, as on one node (dave wrote to eve first, so that his
        seq and hers differ: MSG_A and ACK_N name hers, MSG_N and the acks
        his), each pushed at once by its publication.  Alice on node a and
        bob on node b send each other 200 messages at once: each shows every
        message of the other exactly once and in order, each learns from a
        receipt (ACK_N) that every one of its own was delivered, without
        reconnecting, and each device has its user's whole timeline, every
        entry once (shown, or its own message)."""
        uids = self.make_users(["alice", "bob", "carol", "dave", "eve"], [("alice", "bob")])
        await self.start_nodes("a", "b")
        carol, _, _ = await self.login("a", "carol")
        dave, _, _ = await self.login("b", "dave")
        dave.send(P.MsgR(1, uids["eve"], "first"))
        self.assertEqual((await dave.expect(P.MsgA)).seq, 1)
        carol.send(P.MsgR(7, uids["dave"], "across"))
        msg_a = await carol.expect(P.MsgA)
        self.assertEqual((msg_a.cmid, msg_a.seq), (7, 1))
        msg_n = await dave.expect(P.MsgN)
        self.assertEqual(msg_n, P.MsgN(2, msg_a.msg_id, uids["carol"], "across", msg_n.ts))
        self.assertTrue(recent(msg_n.ts), msg_n)
        dave.send(P.AckR(2))
        self.assertEqual(await dave.next(), P.AckA(2))
        self.assertEqual(await carol.next(), P.AckN(1))
        for wire in (carol, dave):
            await wire.nothing_pending()
        await self.assert_pushed_live()

        alice = self.user("alice", uids["alice"], "a")
        bob = self.user("bob", uids["bob"], "b")
        await alice.client.start()
        await bob.client.start()
        count = 200
        sent = {
            "alice": [alice.send(bob.uid, f"alice {i}") for i in range(count)],
            "bob": [bob.send(alice.uid, f"bob {i}") for i in range(count)],
        }
        await until(
            lambda: all(all_in(outs, DELIVERED) for outs in sent.values())
            and len(alice.shown) >= count and len(bob.shown) >= count,
            timeout=30,
            what="every message shown and its receipt",
        )
        self.assertEqual(bob.bodies_from(alice), [f"alice {i}" for i in range(count)])
        self.assertEqual(alice.bodies_from(bob), [f"bob {i}" for i in range(count)])
        for user in (alice, bob):
            self.assertEqual(self.head(user.uid)[0], 2 * count)
            self.assert_timeline(user)
            # still the first connection: the receipts were ACK_Ns, not
            # a status query after a reconnect
            self.assertEqual((user.client.logins, user.client.resumes), (1, 0), user.name)
            self.assertEqual(user.client.state.last_server,
                             self.server("a" if user is alice else "b"))
        self.assert_no_trouble()

    async def test_group_across_three_nodes(self) -> None:
        """Alice, bob and carol, members of one group, are on nodes a, b
        and c and each sends 30 group messages: every member shows each
        message of the other two exactly once, in its sender's order, and
        none of its own (each has the whole timeline of 90: 60 shown, 30 its
        own); alice's tablet, on node b, shows all 90, hers as copies (with
        the group); every sender gets MSG_A for each, and no receipt (group
        messages have none)."""
        names = ["alice", "bob", "carol"]
        uids = self.make_users(names)
        created = admin(self.database, "group", "create", "trio", "--owner", "alice",
                        "--member", "bob", "--member", "carol")
        await self.start_nodes("a", "b", "c")
        out, err, code = await created
        self.assertEqual(code, 0, err)
        gid = int(out)
        users = [self.user(name, uids[name], node) for name, node in zip(names, "abc",
                                                                             strict=True)]
        tablet = self.user("alice", uids["alice"], "b", device="tablet")
        for user in [*users, tablet]:
            await user.client.start()
        count = 30
        for user in users:
            for i in range(count):
                user.send(gid, f"{user.name} {i}", P.KIND_GROUP)
        await until(
            lambda: all(len(u.shown) >= 2 * count for u in users)
            and len(tablet.shown) >= 3 * count
            and all(all_in(u.sent, STORED) for u in users),
            timeout=30, what="every group message shown by every other member",
        )
        # alice's tablet shows every message, her own as copies
        for user in users:
            self.assertEqual(tablet.bodies_from(user), [f"{user.name} {i}" for i in range(count)])
        self.assertEqual({(m.group, m.to) for m in tablet.shown}, {(gid, None)})
        self.assert_timeline(tablet)
        for user in users:
            for other in users:
                expected = [] if other is user else [f"{other.name} {i}" for i in range(count)]
                self.assertEqual(user.bodies_from(other), expected, (user.name, other.name))
            self.assertEqual(len(user.shown), 2 * count, user.name)
            self.assertEqual({(m.group, m.to) for m in user.shown}, {(gid, None)}, user.name)
            self.assertEqual(len({o.msg_id for o in user.sent}), count)
            self.assertEqual(self.head(user.uid)[0], 3 * count)
            self.assert_timeline(user)
        # every member acked everything: a receipt, if any were sent, came by now
        await until(
            lambda: all(self.head(u.uid)[1] == 3 * count for u in users)
            and self.cursor(tablet) == 3 * count,
            what="every member's acks stored",
        )
        for user in users:
            self.assertTrue(all_in(user.sent, STORED), user.sent)
        self.assert_no_trouble()

    async def test_two_devices_on_two_nodes(self) -> None:
        """Alice's phone is on node a and her tablet on node b; bob's phone
        on node c and his laptop on node a.  Each device signing in brings
        CHANGED "devices" to the user's other device, on its own node.  A
        message from alice's phone: MSG_A to the phone only; MSG_N with bob's
        seq to both of bob's devices; the copy (alice's seq, ``to`` = bob) to
        alice's tablet on node b; the first of bob's acks brings ACK_N
        [alice's seq] to both of alice's devices, the second nothing; every
        push to another node by its publication at once (no catch-up
        round).  Then carol (phone on a, tablet on b) and dave (phone on c, laptop on
        a), SDK clients, all send the other user 25 messages at once: every
        device shows every message of the other user and every copy of
        what its user sent from the other device, each once, in seq order,
        never its own; every device has its user's whole timeline and acked
        it all (its own cursor); every sent message is delivered by
        receipt."""
        uids = self.make_users(["alice", "bob", "carol", "dave"])
        await self.start_nodes("a", "b", "c")
        alice, bob = uids["alice"], uids["bob"]
        phone, _, _ = await self.login("a", "alice")
        tablet, _, _ = await self.login("b", "alice")
        self.assertEqual((await phone.expect(P.Changed)).what, "devices")
        bob_phone, _, _ = await self.login("c", "bob")
        laptop, _, _ = await self.login("a", "bob")
        self.assertEqual((await bob_phone.expect(P.Changed)).what, "devices")

        phone.send(P.MsgR(1, bob, "你好"))
        msg_a = await phone.expect(P.MsgA)
        self.assertEqual((msg_a.cmid, msg_a.seq), (1, 1))
        to_bob = [await device.expect(P.MsgN) for device in (bob_phone, laptop)]
        ts = to_bob[0].ts
        self.assertTrue(recent(ts))
        for msg_n in to_bob:
            self.assertEqual(msg_n, P.MsgN(1, msg_a.msg_id, alice, "你好", ts))
        copy = await tablet.expect(P.MsgN)
        self.assertEqual(copy, P.MsgN(msg_a.seq, msg_a.msg_id, alice, "你好", ts, None, bob))
        await phone.nothing_pending()  # the sending device gets no MSG_N of its own
        bob_phone.send(P.AckR(1))
        self.assertEqual(await bob_phone.next(), P.AckA(1))
        for device in (phone, tablet):
            self.assertEqual(await device.next(), P.AckN(msg_a.seq))
        laptop.send(P.AckR(1))
        self.assertEqual(await laptop.next(), P.AckA(1))
        tablet.send(P.AckR(msg_a.seq))
        self.assertEqual(await tablet.next(), P.AckA(msg_a.seq))
        for device in (phone, tablet, bob_phone, laptop):
            await device.nothing_pending()
        await self.assert_pushed_live()

        where = {("carol", "phone"): "a", ("carol", "tablet"): "b",
                 ("dave", "phone"): "c", ("dave", "laptop"): "a"}
        devices = [self.user(name, uids[name], node, device=kind)
                   for (name, kind), node in where.items()]
        peer = {"carol": uids["dave"], "dave": uids["carol"]}
        for d in devices:
            await d.client.start()
        count = 25
        for i in range(count):
            for d in devices:
                d.send(peer[d.name], f"{d.name} {d.client.device} {i}")
        await until(
            lambda: all(len(d.shown) >= 3 * count and all_in(d.sent, DELIVERED)
                        for d in devices),
            timeout=30, what="every device showing everything, every receipt",
        )
        for d in devices:
            self.assertEqual(self.head(d.uid)[0], 4 * count)
            self.assert_timeline(d)
            for e in devices:
                expected = [] if e is d else [o.body for o in e.sent]
                prefix = f"{e.name} {e.client.device} "
                self.assertEqual([m.body for m in d.shown if str(m.body).startswith(prefix)],
                                 expected, (d, e))
            for message in d.shown:
                # a copy of the user's own message names whom it went to
                self.assertEqual(message.to, peer[d.name] if message.sender == d.uid else None,
                                 message)
            self.assertEqual((d.client.logins, d.client.resumes), (1, 0), d)
        await until(lambda: all(self.cursor(d) == 4 * count for d in devices),
                    what="every device's cursor at the head")
        self.assert_no_trouble()


class SessionTests(Cluster):
    async def test_resume_on_another_node(self) -> None:
        """Bob's connection to node b drops; while he is away alice (node
        a) sends him 5 messages; bob's client resumes on node a: RESUMED,
        not WELCOME (no LOGIN: the password is long forgotten), no ONLINE
        (his device was online all along), and it shows the 5 messages
        (pulled from the timeline) once.  Alice sees no PRESENCE at all for
        the drop and the move; bob's HTTP token works on both nodes' HTTP."""
        uids = self.make_users(["alice", "bob"], [("alice", "bob")])
        await self.start_nodes("a", "b")
        alice = self.user("alice", uids["alice"], "a")
        bob = self.user("bob", uids["bob"], "b")
        await alice.client.start()
        await bob.client.start()
        await until(lambda: alice.presence == [(bob.uid, True)], what="bob online for alice")
        self.assertEqual((alice.online, bob.online), ([()], [(alice.uid,)]))
        bob.hold()
        bob.drop()
        await until(lambda: not bob.client.connected, what="the drop")
        sent = [alice.send(bob.uid, f"while away {i}") for i in range(5)]
        await until(lambda: all_stored(sent), what="MSG_As")
        self.assertEqual(bob.shown, [])
        # bob's phone is back on the network, and its client picks node a
        bob.client.state.last_server = self.server("a")
        bob.release()
        await until(lambda: len(bob.shown) == 5, what="bob showing the messages")
        self.assertEqual(bob.client.state.last_server, self.server("a"))
        self.assertEqual((bob.client.logins, bob.client.resumes), (1, 1))
        self.assertIsNone(bob.client.password)
        self.assertEqual(bob.bodies_from(alice), [f"while away {i}" for i in range(5)])
        await until(lambda: all_in(sent, DELIVERED), what="alice's receipts")
        # the session goes on: a message each way, on node a now
        back = bob.send(alice.uid, "back")
        await until(lambda: back.state == DELIVERED and len(alice.shown) == 1,
                    what="bob's message")
        self.assertEqual(alice.bodies_from(bob), ["back"])
        token = bob.client.token
        self.assertEqual(token, bob.client.state.session and bob.client.state.session["token"])
        versions = {}
        for node in ("a", "b"):
            code, versions[node] = await self.get(node, "/v1/versions", token)
            self.assertEqual(code, 200, (node, versions[node]))
        self.assertEqual(versions["a"], versions["b"])
        code, _ = await self.get("b", "/v1/versions", "not-a-token")
        self.assertEqual(code, 401)
        self.assertEqual(alice.presence, [(bob.uid, True)])
        self.assertEqual(bob.online, [(alice.uid,)])
        self.assertEqual(bob.client.duplicates, 0)
        for user in (alice, bob):
            self.assert_timeline(user)
        self.assert_no_trouble()

    async def test_presence(self) -> None:
        """Alice on node a sees exactly one PRESENCE true when bob's phone
        signs in on node b; none when its connection drops and it resumes
        on node c (RESUMED, then nothing: no ONLINE; the same RESUME
        replayed on node a gets ERROR 409 and leaves the session on c
        alone); exactly one PRESENCE false when it says BYE.  Then bob's
        phone signs in again on b; a newer LOGIN of the same phone on c
        replaces that session (KICKED 1, no PRESENCE); his tablet signs in
        on a (ONLINE with alice; CHANGED "devices" to the phone on c; no
        PRESENCE: bob was online) and says BYE (no PRESENCE: the phone is
        online); the phone moves back to b by a drop and a RESUME and its
        connection then drops for good: alice sees exactly one PRESENCE
        false once the linger time is over, from node b (nodes a and c,
        where bob's devices were before, say nothing)."""
        linger = 2
        uids = self.make_users(["alice", "bob"], [("alice", "bob")])
        await self.start_nodes("a", "b", "c", linger=linger)
        alice = self.user("alice", uids["alice"], "a")
        await alice.client.start()
        bob_uid = uids["bob"]
        online, offline = (bob_uid, True), (bob_uid, False)
        phone_id = new_device()

        # sign in on b, drop, resume on c, BYE
        wire, welcome, told = await self.login("b", "bob", phone_id)
        self.assertEqual(told, P.Online((alice.uid,)))
        await until(lambda: alice.presence == [online], what="PRESENCE true")
        await drop(wire)
        dropped = reactor.seconds()
        resume = resume_for(welcome)
        wire = await connect(self.nodes["c"].access_port)
        self.addCleanup(close, wire)
        wire.send(resume)
        answer = await wire.next()
        self.assertEqual(answer, P.Resumed(bob_uid, 0, answer.iplist_version, 0))
        await wire.nothing_pending()
        # the same RESUME replayed on node a: refused, the session undisturbed
        replay = await connect(self.nodes["a"].access_port)
        self.addCleanup(close, replay)
        replay.send(resume)
        self.assertEqual((await replay.expect(P.Error)).code, 409)
        await replay.nothing_pending()
        await wire.nothing_pending()
        # past the linger time of the drop: node b has let the device go
        await sleep(max(0.0, dropped + linger + 1 - reactor.seconds()))
        self.assertEqual(alice.presence, [online])
        wire.send(P.Bye())
        await wire.lost
        await until(lambda: alice.presence == [online, offline], what="PRESENCE false")

        # sign in on b again; a newer LOGIN of the phone on c replaces that
        # session (KICKED 1, nothing for alice)
        old, _, _ = await self.login("b", "bob", phone_id)
        await until(lambda: alice.presence == [online, offline, online],
                    what="PRESENCE true again")
        wire, welcome, _ = await self.login("c", "bob", phone_id)
        self.assertEqual(await kicked(old), P.Kicked(P.KICKED_REPLACED))
        await old.lost
        # the tablet on a: bob is online already
        tablet, _, told = await self.login("a", "bob")
        self.assertEqual(told, P.Online((alice.uid,)))
        self.assertEqual((await wire.expect(P.Changed)).what, "devices")
        tablet.send(P.Bye())
        await tablet.lost
        # the phone: drop, resume back on b, drop for good: the linger time
        # runs out on b
        await drop(wire)
        wire, answer = await self.resume("b", welcome)
        self.assertIsInstance(answer, P.Resumed)
        await wire.nothing_pending()
        await drop(wire)
        dropped = reactor.seconds()
        await until(lambda: alice.presence[3:] == [offline], timeout=linger + 5,
                    what="PRESENCE false after the linger time")
        self.assertGreaterEqual(reactor.seconds() - dropped, linger - 0.5)
        # long enough for a second one from any node
        await sleep(linger + 1)
        self.assertEqual(alice.presence, [online, offline, online, offline])
        self.assertEqual(alice.online, [()])
        expired = f"device of uid={bob_uid} went offline (linger expired)".encode()
        self.assertEqual([self.nodes[n].output.count(expired) for n in "abc"], [0, 1, 0],
                         self.logs())
        self.assert_no_trouble()


    async def test_sign_out_across_nodes(self) -> None:
        """Alice's phone is on node a, her tablet on node b; bob, her
        friend, on node a.  ``GET /v1/devices`` on node b lists both as
        online, the phone current.  The phone signs the tablet out over
        node a's HTTP: the tablet's connection on node b gets KICKED 5 and
        is closed, its session is gone (RESUME: ERROR 409, on either node),
        the phone gets CHANGED "devices", bob no PRESENCE (alice is still
        online).  The phone then signs itself out over node b's HTTP: KICKED
        5 on node a, its token refused on both nodes, and bob gets PRESENCE
        false, once."""
        uids = self.make_users(["alice", "bob"], [("alice", "bob")])
        await self.start_nodes("a", "b")
        bob = self.user("bob", uids["bob"], "a")
        await bob.client.start()
        phone_id, tablet_id = new_device(), new_device()
        phone, welcome, _ = await self.login("a", "alice", phone_id)
        tablet, tablet_welcome, _ = await self.login("b", "alice", tablet_id)
        self.assertEqual((await phone.expect(P.Changed)).what, "devices")
        await until(lambda: bob.presence == [(uids["alice"], True)], what="alice online")
        code, listed = await self.get("b", "/v1/devices", welcome.token)
        self.assertEqual(code, 200, listed)
        self.assertEqual(
            sorted((d["id"], d["current"], d["online"]) for d in listed["devices"]),
            sorted([(b64(phone_id), True, True), (b64(tablet_id), False, True)]))

        code = await self.delete("a", f"/v1/devices/{b64(tablet_id)}", welcome.token)
        self.assertEqual(code, 204)
        self.assertEqual(await kicked(tablet), P.Kicked(P.KICKED_SIGNED_OUT))
        await tablet.lost
        changed = await phone.expect(P.Changed)
        self.assertEqual(changed.what, "devices")
        for node in ("a", "b"):
            wire, answer = await self.resume(node, tablet_welcome)
            self.assertEqual((type(answer), getattr(answer, "code", None)), (P.Error, 409))
        await phone.nothing_pending()

        code = await self.delete("b", "/v1/devices/current", welcome.token)
        self.assertEqual(code, 204)
        self.assertEqual(await kicked(phone), P.Kicked(P.KICKED_SIGNED_OUT))
        await phone.lost
        for node in ("a", "b"):
            code, _ = await self.get(node, "/v1/versions", welcome.token)
            self.assertEqual(code, 401, node)
        await until(lambda: len(bob.presence) == 2, what="PRESENCE false")
        await sleep(1)  # long enough for a second one
        self.assertEqual(bob.presence, [(uids["alice"], True), (uids["alice"], False)])
        self.assert_no_trouble()


class FailureTests(Cluster):
    async def test_node_killed(self) -> None:
        """Four users, two on node a and two on node b, each sends 150
        messages to the next one (every message crosses nodes), and u0 (on
        a) has a second device on b; node a is killed with SIGKILL
        mid-flow.  Its users' clients go to node b and
        RESUME there (no new sign-in); every message that got MSG_A before
        the kill is stored once (one entry in its sender's timeline, one in
        its receiver's), every message is shown exactly once and in order,
        every device has its user's whole timeline (u0's second device what
        u0 received and, as copies, what u0 sent), and every sender learns
        all were delivered (by ACK_N, or by asking, for a receipt lost with
        node a).  After node_ttl node b has node a's devices: its IP list
        drops a's server (a new version), a device left on a resumes on b
        (RESUMED, and nothing else: it was online all along), and one whose
        client never comes back goes offline after the linger time, its
        friend seeing PRESENCE false once.  Node a, started again
        meanwhile, is back in the IP list (the version of before), and the
        resumed device resumes there again."""
        linger = 5
        names = ["u0", "u1", "u2", "u3", "dozy", "gone"]
        uids = self.make_users(names, [("u0", "gone")])
        await self.start_nodes("a", "b", linger=linger)
        version_before = await self.iplists_show(["a", "b"])
        home = {"u0": "a", "u1": "b", "u2": "a", "u3": "b"}
        # HTTP goes to b, the node that lives (as through a load balancer)
        users = [self.user(name, uids[name], home[name], http="b", resend_after=1.0)
                 for name in home]
        for user in users:
            await user.client.start()
        u0 = users[0]
        # u0's second device, on b: it shows what u0 receives, and copies of
        # what u0 sends from the phone on a
        tablet = self.user("u0", uids["u0"], "b", http="b", device="tablet")
        await tablet.client.start()
        # devices on a that no client resumes before node b adopts them
        _, dozy, _ = await self.login("a", "dozy")
        await self.login("a", "gone")
        await until(lambda: u0.presence == [(uids["gone"], True)], what="gone online")

        per_sender = 150

        def send_some() -> None:
            for i, user in enumerate(users):
                if len(user.sent) < per_sender:
                    to = users[(i + 1) % len(users)]
                    user.send(to.uid, f"{user.name} {len(user.sent)}")

        pacer = task.LoopingCall(send_some)
        pacer.start(0.01)
        self.addCleanup(lambda: pacer.stop() if pacer.running else None)
        await until(
            lambda: all(sum(o.msg_id is not None for o in u.sent) >= 30 for u in users),
            what="messages stored by both nodes",
        )
        ended = await self.nodes["a"].stop(signal.SIGKILL)
        killed = reactor.seconds()
        self.assertEqual(ended.signal, signal.SIGKILL)
        acknowledged = {
            (u.name, o.msg_id, o.seq) for u in users for o in u.sent if o.msg_id is not None
        }
        self.assertLess(len(acknowledged), len(users) * per_sender, "the flow was over")

        # a's users are on b within a moment, on their old sessions
        await until(lambda: all(u.client.connected and u.client.state.last_server
                                == self.server("b") for u in users),
                    timeout=linger, what="every client on node b")
        resumed_after = reactor.seconds() - killed
        for user in users:
            self.assertEqual(user.client.logins, 1, user.name)
            self.assertEqual(user.client.resumes, 1 if home[user.name] == "a" else 0,
                             user.name)

        def done() -> bool:
            return all(
                len(u.sent) == per_sender
                and all_stored(u.sent)
                and len(users[(i + 1) % len(users)].shown) >= per_sender
                for i, u in enumerate(users)
            ) and len(tablet.shown) >= 2 * per_sender

        def progress() -> str:
            return ", ".join(
                f"{u.name}: sent {len(u.sent)}, stored "
                f"{sum(o.msg_id is not None for o in u.sent)}, delivered "
                f"{sum(o.state == DELIVERED for o in u.sent)}, shown {len(u.shown)}"
                for u in users
            ) + f", u0's tablet: shown {len(tablet.shown)}"

        try:
            await until(done, timeout=30, what="every message shown and delivered")
        except AssertionError:
            raise AssertionError(progress()) from None
        shown_after = reactor.seconds() - killed
        # receipts: an ACK_R that node a stored just before it died may have
        # taken its ACK_N with it (ACK_N is best effort); the senders that
        # stayed connected ask with POST /v1/status, as the contract says
        await until(
            lambda: all(self.head(u.uid) == (2 * per_sender, 2 * per_sender) for u in users),
            what="every timeline complete and acked",
        )
        await sleep(0.5)  # the ACK_Ns of the last acks on their way
        receipts = sum(o.state == DELIVERED for u in users for o in u.sent)

        async def delivered() -> bool:
            for user in users:
                await user.client.refresh_status()
            return all(all_in(u.sent, DELIVERED) for u in users)

        await poll(delivered, 10, progress)
        db = self.db()
        for i, user in enumerate(users):
            receiver = users[(i + 1) % len(users)]
            self.assertEqual(receiver.bodies_from(user),
                             [f"{user.name} {k}" for k in range(per_sender)], receiver.name)
            self.assert_timeline(user)
        self.assertEqual(tablet.bodies_from(u0), [f"u0 {k}" for k in range(per_sender)])
        self.assertEqual({m.to for m in tablet.shown if m.sender == u0.uid}, {users[1].uid})
        self.assertEqual(tablet.bodies_from(users[3]), [f"u3 {k}" for k in range(per_sender)])
        self.assert_timeline(tablet)
        self.assertEqual((tablet.client.logins, tablet.client.resumes), (1, 0))
        shown_ids = [(u, m.msg_id) for u in [*users, tablet] for m in u.shown]
        self.assertEqual(len(shown_ids), len(set(shown_ids)))
        for name, msg_id, seq in acknowledged:
            entries = db.execute("SELECT uid, seq FROM inbox WHERE msg_id = ? ORDER BY uid = ?",
                                 (msg_id, uids[name])).fetchall()
            self.assertEqual(len(entries), 2, (name, msg_id))
            self.assertEqual(entries[1], (uids[name], seq), (name, msg_id))
        self.assertEqual(db.execute("SELECT count(*) FROM messages").fetchone()[0],
                         len(users) * per_sender)

        # node a is dead: b adopts its two devices left, and drops its server
        b = self.nodes["b"]
        await until(lambda: b"adopted 2 devices" in b.output,
                    timeout=2 * NODE_TTL + 2, what="node b adopting a's devices")
        version_after = await self.iplists_show(["b"])
        self.assertNotEqual(version_after, version_before)
        wire, answer = await self.resume("b", dozy)
        self.assertIsInstance(answer, P.Resumed)
        self.assertEqual(answer.uid, uids["dozy"])
        await wire.nothing_pending()
        # node a starts again (a new node, on the same ports): the IP list
        # is the one of before, and dozy's device moves back there
        a = self.nodes["a"]
        await a.restart()
        await until(lambda: b"joined through Redis" in a.output, what="node a joining again")
        self.assertEqual(await self.iplists_show(["a", "b"]), version_before)
        await drop(wire)
        wire, answer = await self.resume("a", dozy)
        self.assertEqual(answer, P.Resumed(uids["dozy"], 0, version_before, 0))
        await wire.nothing_pending()
        # gone's device goes offline on b after the linger time: one PRESENCE false
        gone_off = (uids["gone"], False)
        await until(lambda: gone_off in u0.presence, timeout=linger + 5,
                    what="PRESENCE false for the device nobody resumed")
        await sleep(1)
        self.assertEqual(u0.presence, [(uids["gone"], True), gone_off])
        self.assert_no_trouble()
        print(f"\nkill: resumed on b after {resumed_after:.1f}s, all shown after "
              f"{shown_after:.1f}s, {receipts} of {len(users) * per_sender} receipts "
              "came without asking")

    async def test_redis_restarted(self) -> None:
        """Redis is killed (losing its data) and started again 3 seconds
        later.  Meanwhile alice and carol, both on node a, go on exchanging
        messages; alice and bob (node b) send each other messages too.  Once
        Redis is back the nodes rejoin and bob and alice get each other's
        messages within about a housekeeping round; nothing is lost, nothing
        shown twice, every message is delivered, every device has its
        user's whole timeline, and each node logged the outage and its
        rejoining.  Alice, friend of both, sees no PRESENCE beyond their
        coming online at the start: nobody went offline.  Afterwards Redis
        knows the devices again: a new message between the nodes comes at
        once with its receipt, bob resumes on node a, and the HTTP tokens of
        the users of node a work on node b."""
        uids = self.make_users(["alice", "bob", "carol"], [("alice", "bob"), ("alice", "carol")])
        await self.start_nodes("a", "b")
        alice = self.user("alice", uids["alice"], "a")
        carol = self.user("carol", uids["carol"], "a")
        bob = self.user("bob", uids["bob"], "b")
        users = (alice, bob, carol)
        for user in users:
            await user.client.start()
        present = [(bob.uid, True), (carol.uid, True)]
        await until(lambda: alice.presence == present, what="bob and carol online")
        first = alice.send(bob.uid, "before")
        await until(lambda: first.state == DELIVERED, what="a message before the outage")

        restarted = self.redis.restart(down_for=3.0)
        self.addCleanup(lambda: restarted)
        for name, node in self.nodes.items():
            await until(lambda node=node: b"is unreachable" in node.output,
                        what=f"node {name} noticing the outage")
        count = 20
        for one, other in ((alice, carol), (carol, alice), (alice, bob), (bob, alice)):
            for i in range(count):
                one.send(other.uid, f"{one.name} to {other.name} {i}")
        await until(
            lambda: len(carol.bodies_from(alice)) == count
            and len(alice.bodies_from(carol)) == count
            and all(all_stored(u.sent) for u in users),
            what="messages on node a and every MSG_A during the outage",
        )
        self.assertFalse(self.redis.running, "Redis came back before the messages went")
        await restarted
        back = reactor.seconds()
        await until(
            lambda: len(bob.bodies_from(alice)) == count + 1
            and len(alice.bodies_from(bob)) == count,
            timeout=20, what="messages between the nodes after the outage",
        )
        caught_up_after = reactor.seconds() - back
        for name, node in self.nodes.items():
            await until(lambda node=node: node.output.count(b"joined through Redis") == 2,
                        timeout=10, what=f"node {name} rejoining")
        rejoined_after = reactor.seconds() - back
        self.assertEqual(bob.bodies_from(alice),
                         ["before"] + [f"alice to bob {i}" for i in range(count)])
        for one, other in ((alice, carol), (carol, alice), (bob, alice)):
            self.assertEqual(other.bodies_from(one),
                             [f"{one.name} to {other.name} {i}" for i in range(count)])
        for user in users:
            self.assert_timeline(user)
            self.assertEqual((user.client.logins, user.client.resumes), (1, 0), user.name)
        # Redis knows the devices again: a message goes at once, with its
        # receipt, and bob can resume on node a
        after = alice.send(bob.uid, "after")
        await until(lambda: after.state == DELIVERED, timeout=3, what="a message after")
        bob.hold()
        bob.drop()
        await until(lambda: not bob.client.connected, what="bob's drop")
        bob.client.state.last_server = self.server("a")
        bob.release()
        await until(lambda: bob.client.connected, what="bob on node a")
        self.assertEqual((bob.client.logins, bob.client.resumes), (1, 1))
        # and the HTTP tokens work on every node
        for user in users:
            code, body = await self.get("b", "/v1/versions", user.client.token)
            self.assertEqual(code, 200, (user.name, body))

        # receipts: what was acked while Redis was away reached no other
        # node; the senders ask (POST /v1/status), as the contract says
        async def delivered() -> bool:
            for user in users:
                await user.client.refresh_status()
            return all(all_in(u.sent, DELIVERED) for u in users)

        await poll(delivered, 10, lambda: f"every message delivered: {[u.sent for u in users]}")
        self.assertEqual(alice.presence, present, self.logs())
        self.assert_no_trouble()
        print(f"\nredis: cross-node messages caught up {caught_up_after:.1f}s, both nodes "
              f"rejoined {rejoined_after:.1f}s after it was back")


class PartialOutageTests(Cluster):
    """Node a reaches Redis through a relay that the test cuts: it loses
    Redis while node b keeps it.  ``node_ttl`` is long enough that node b
    does not take node a for dead meanwhile."""

    async def start_cut_off(self, linger: int) -> tuple[Relay, dict[str, int]]:
        relay = Relay(self.redis.port)
        await relay.listen()
        self.addCleanup(relay.cut)
        uids = self.make_users(["alice", "bob"], [("alice", "bob")])
        await self.start_nodes("a", "b", linger=linger, redis={"a": relay.endpoint},
                               node_ttl=30, converge=False)
        return relay, uids

    async def cut_and_move(self, relay: Relay, bob: P.Welcome,
                           wire: PacketClient) -> PacketClient:
        """Cut node a off, drop bob's connection to a, RESUME on node b."""
        await relay.cut()
        await until(lambda: b"is unreachable" in self.nodes["a"].output,
                    what="node a losing Redis")
        await drop(wire)
        wire, answer = await self.resume("b", bob)
        self.assertIsInstance(answer, P.Resumed)
        return wire

    async def after_rejoin(self, relay: Relay, alice: User, bob: int,
                           wire: PacketClient) -> list[Any]:
        """Mend the relay, wait for node a to rejoin, send bob a message
        from alice: what bob's connection on node b receives (it ends with
        the message, unless the connection was closed)."""
        await relay.listen()
        a = self.nodes["a"]
        await until(lambda: a.output.count(b"joined through Redis") == 2, timeout=10,
                    what="node a back in Redis")
        hello = alice.send(bob, "are you there?")
        await until(lambda: hello.msg_id is not None, what="MSG_A")
        await until(lambda: wire.lost.called
                    or any(isinstance(p, P.MsgN) for p in wire.packets.pending),
                    timeout=15, what="alice's message, or the end of bob's connection")
        return list(wire.packets.pending)

    async def test_move_while_cut_off(self) -> None:
        """Bob, on node a, loses his connection and resumes on node b while
        node a is cut off from Redis; node a is back in Redis a moment
        later (well within the linger time).  Bob's connection on node b
        stays open, and alice's next message reaches him there, and nothing
        else does (no ONLINE: his device never went offline; no KICKED);
        alice sees no PRESENCE but the first."""
        relay, uids = await self.start_cut_off(linger=30)
        alice = self.user("alice", uids["alice"], "a")
        await alice.client.start()
        wire, welcome, _ = await self.login("a", "bob")
        await until(lambda: alice.presence == [(uids["bob"], True)], what="bob online")
        wire = await self.cut_and_move(relay, welcome, wire)
        received = await self.after_rejoin(relay, alice, uids["bob"], wire)
        self.assertFalse(wire.lost.called,
                         f"bob's connection to node b was closed; it got {received}"
                         + self.logs())
        self.assertEqual([(type(p), p.body) for p in received],
                         [(P.MsgN, "are you there?")])
        self.assertEqual(alice.presence, [(uids["bob"], True)])
        self.assert_no_trouble()

    async def test_linger_over_while_cut_off(self) -> None:
        """Bob, on node a, loses his connection and resumes on node b while
        node a is cut off from Redis, and node a stays cut off past the
        linger time of bob's old connection.  His friend alice (node a) sees
        no PRESENCE false (bob never went offline), neither then nor when
        node a is back in Redis; bob's connection on node b stays open and
        alice's next message reaches him there, and nothing else does."""
        linger = 2
        relay, uids = await self.start_cut_off(linger=linger)
        alice = self.user("alice", uids["alice"], "a")
        await alice.client.start()
        wire, welcome, _ = await self.login("a", "bob")
        await until(lambda: alice.presence == [(uids["bob"], True)], what="bob online")
        wire = await self.cut_and_move(relay, welcome, wire)
        # past the linger time of the copy on node a
        expired = f"device of uid={uids['bob']} went offline (linger expired)".encode()
        await until(lambda: expired in self.nodes["a"].output, timeout=linger + 5,
                    what="the linger time of bob's copy on node a running out")
        await sleep(0.5)  # long enough for a PRESENCE false to reach alice
        presence_while_cut = list(alice.presence)
        received = await self.after_rejoin(relay, alice, uids["bob"], wire)
        self.assertEqual(
            (presence_while_cut, alice.presence, wire.lost.called),
            ([(uids["bob"], True)], [(uids["bob"], True)], False),
            "(alice's PRESENCE while a was cut off, afterwards, bob's connection closed); "
            f"bob received {received}" + self.logs(),
        )
        self.assertEqual([(type(p), p.body) for p in received],
                         [(P.MsgN, "are you there?")])
        self.assert_no_trouble()


class IPListTests(Cluster):
    async def test_iplist_follows_the_nodes(self) -> None:
        """GET /v1/iplist on every node lists every live node's access
        server with the weight configured on that node, with the same
        version everywhere; the version changes when node c joins, and when
        it stops (SIGTERM) it goes back to the version of the list without
        c.  Carol, on node c when it stops, carries on on another node with
        her session (RESUMED, no ONLINE), her client fetches the new IP list
        (a RESUMED has its version), and her friend alice sees no
        PRESENCE."""
        weights = {"a": 1, "b": 2, "c": 5}
        uids = self.make_users(["alice", "carol"], [("alice", "carol")])
        await self.start_nodes("a", "b", weights=weights)
        two = await self.iplists_show(["a", "b"])
        await self.start_nodes("c", weights=weights)
        three = await self.iplists_show(["a", "b", "c"])
        self.assertNotEqual(three, two)
        alice = self.user("alice", uids["alice"], "a")
        # HTTP goes to a, the node that stays (as through a load balancer)
        carol = self.user("carol", uids["carol"], "c", http="a")
        await alice.client.start()
        await carol.client.start()
        await until(lambda: alice.presence == [(carol.uid, True)], what="carol online")
        ended = await self.nodes["c"].stop()
        self.assertTrue(ended.clean, ended)
        stopped = reactor.seconds()
        after = await self.iplists_show(["a", "b"], timeout=NODE_TTL + 2)
        self.assertEqual(after, two)
        # a stopped node leaves the registry at once: no wait for its TTL
        self.assertLess(reactor.seconds() - stopped, NODE_TTL)
        await until(lambda: carol.client.connected, what="carol on another node")
        self.assertIn(carol.client.state.last_server, [self.server("a"), self.server("b")])
        self.assertEqual((carol.client.logins, carol.client.resumes), (1, 1))
        # her next RESUMED (after a drop), if not that one, has the version
        # of the IP list without c: her client fetches the list
        carol.drop()
        await until(lambda: carol.client.connected and carol.client.resumes == 2,
                    what="carol back after a drop")
        await until(lambda: carol.client.state.servers == self.listed(["a", "b"]),
                    what="carol's client knowing the IP list without c")
        self.assertEqual(carol.client.state.iplist_version, two)
        hello = alice.send(carol.uid, "still there?")
        await until(lambda: hello.state == DELIVERED, what="a message to carol")
        self.assertEqual(carol.bodies_from(alice), ["still there?"])
        self.assertEqual(alice.presence, [(carol.uid, True)])
        self.assertEqual(carol.online, [(alice.uid,)])
        self.assert_no_trouble()

