"""End to end: several real nodes (``twistd -n im58d``) behind one real
``redis-server``, sharing one SQLite database file.

Each node has its own ports and its own config file (``[routing] backend =
redis``, a small ``node_ttl``, and a small ``[session] linger`` where a test
waits for an expiry).  Users are SDK clients (``im58d.client.Client``) that
know every node's access server, as they would from ``GET /v1/iplist``, and
start on the node a test puts them on (the last server they used); where a
test needs a session that does not come back, it is a bare wire client.
Where one node must lose Redis while the others keep it, that node reaches
Redis through a ``Relay`` that the test cuts.
"""

from __future__ import annotations

import hashlib
import hmac
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

from .e2e import Daemon, PacketClient, admin, connect, free_port, until
from .redis_server import HOST, SKIP, RedisServer, Relay
from .test_shared_store import make_users

# seconds a node's registry entry lives: a killed node is dead after this
NODE_TTL = 3
# what in a node's output means something went wrong inside it
TROUBLE = (b"Traceback", b"Unhandled")


def resume_for(welcome: P.Welcome) -> P.Resume:
    """A RESUME proving the session key of ``welcome``, with a fresh nonce."""
    ts = int(time.time())
    nonce = os.urandom(8)
    mac = hmac.new(welcome.session_key, welcome.session_id + ts.to_bytes(8, "big") + nonce,
                   hashlib.sha256).digest()[:16]
    return P.Resume(welcome.session_id, ts, nonce, mac)


async def sleep(seconds: float) -> None:
    """Only where nothing can be awaited: to see that something does NOT
    happen (a second PRESENCE, say) within the time it would take."""
    await task.deferLater(reactor, seconds)


class User:
    """An SDK client and what its app saw: messages shown, PRESENCE received."""

    def __init__(self, name: str, uid: int) -> None:
        self.name = name
        self.uid = uid
        self.shown: list[Message] = []
        self.presence: list[tuple[int, bool]] = []
        self.client: Client

    def on_presence(self, uid: int, online: bool) -> None:
        self.presence.append((uid, online))

    def bodies_from(self, sender: User) -> list[str | bytes]:
        return [m.body for m in self.shown if m.sender == sender.uid]

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
    timeout = 90

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

    # HTTP

    async def get(self, node: str, path: str, token: str | None = None) -> tuple[int, Any]:
        headers: dict[bytes | str, bytes | str] = (
            {"Authorization": f"Bearer {token}"} if token else {}
        )
        response = await self.http.get(self.url(node, path), headers=headers)
        return response.code, await response.json()

    # clients

    def make_users(self, names: Sequence[str],
                   friends: Iterable[tuple[str, str]] = ()) -> dict[str, int]:
        return make_users(self.database, names, friends)

    def user(self, name: str, uid: int, node: str, http: str | None = None,
             **kwargs: Any) -> User:
        """An SDK client for ``name`` that starts on ``node`` (its last used
        server) and knows every running node's access server, so that it
        fails over to another one; its HTTP goes to ``http`` (default:
        ``node``)."""
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
            reactor, None, None, self.url(http or node), name, "pw", device=f"e2e-{name}",
            state=state, on_message=user.shown.append, on_presence=user.on_presence,
            http=self.http, **kwargs,
        )
        self.addCleanup(user.client.stop)
        return user

    async def login(self, node: str, name: str) -> tuple[PacketClient, P.Welcome]:
        """A bare wire client logged in as ``name`` on ``node``."""
        wire = await connect(self.nodes[node].access_port)
        self.addCleanup(close, wire)
        wire.send(P.Login(name, "pw", "raw"))
        welcome = await wire.next()
        self.assertIsInstance(welcome, P.Welcome, f"{name} on {node}")
        return wire, welcome

    async def resume(self, node: str, welcome: P.Welcome) -> tuple[PacketClient, Any]:
        """A bare wire client that RESUMEs ``welcome``'s session on ``node``:
        the client and the answer."""
        wire = await connect(self.nodes[node].access_port)
        self.addCleanup(close, wire)
        wire.send(resume_for(welcome))
        return wire, await wire.next()


def close(wire: PacketClient) -> Any:
    if not wire.lost.called:
        transport: Any = wire.transport
        transport.abortConnection()
    return wire.lost


async def drop(wire: PacketClient) -> None:
    """The connection breaks without BYE."""
    transport: Any = wire.transport
    transport.abortConnection()
    await wire.lost


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


class MessagingTests(Cluster):
    async def test_messages_between_nodes(self) -> None:
        """Carol on node a sends dave on node b a message: the six packets of
        the contract, as on one node.  Alice on node a and bob on node b
        send each other 200 messages at once: each shows every message of
        the other exactly once and in order, and each learns from a receipt
        (ACK_N) that every one of its own was delivered, without
        reconnecting."""
        uids = self.make_users(["alice", "bob", "carol", "dave"], [("alice", "bob")])
        await self.start_nodes("a", "b")
        carol, _ = await self.login("a", "carol")
        dave, _ = await self.login("b", "dave")
        carol.send(P.MsgR(7, uids["dave"], "across"))
        msg_a = await carol.next()
        self.assertIsInstance(msg_a, P.MsgA)
        self.assertEqual(msg_a.cmid, 7)
        msg_n = await dave.next()
        self.assertEqual(msg_n, P.MsgN(1, msg_a.msg_id, uids["carol"], "across", msg_a.ts))
        dave.send(P.AckR(1))
        self.assertEqual(await dave.next(), P.AckA(1))
        self.assertEqual(await carol.next(), P.AckN(7, msg_a.msg_id))

        alice = self.user("alice", uids["alice"], "a")
        bob = self.user("bob", uids["bob"], "b")
        await alice.client.start()
        await bob.client.start()
        count = 200
        sent = {
            "alice": [alice.client.send(bob.uid, f"alice {i}") for i in range(count)],
            "bob": [bob.client.send(alice.uid, f"bob {i}") for i in range(count)],
        }
        await until(
            lambda: all(all_in(outs, DELIVERED) for outs in sent.values())
            and len(alice.shown) >= count and len(bob.shown) >= count,
            timeout=30,
            what="every message shown and its receipt",
        )
        self.assertEqual(bob.bodies_from(alice), [f"alice {i}" for i in range(count)])
        self.assertEqual(alice.bodies_from(bob), [f"bob {i}" for i in range(count)])
        self.assertEqual([m.seq for m in bob.shown], list(range(1, count + 1)))
        self.assertEqual([m.seq for m in alice.shown], list(range(1, count + 1)))
        for user in (alice, bob):
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
        none of its own; every sender gets MSG_A for each, and no receipt
        (group messages have none)."""
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
        for user in users:
            await user.client.start()
        count = 30
        sent = {
            user.name: [user.client.send(gid, f"{user.name} {i}", P.KIND_GROUP)
                        for i in range(count)]
            for user in users
        }
        await until(
            lambda: all(len(u.shown) >= 2 * count for u in users)
            and all(all_in(outs, STORED) for outs in sent.values()),
            timeout=30, what="every group message shown by every other member",
        )
        for user in users:
            for other in users:
                expected = [] if other is user else [f"{other.name} {i}" for i in range(count)]
                self.assertEqual(user.bodies_from(other), expected, (user.name, other.name))
            self.assertEqual(len(user.shown), 2 * count, user.name)
            self.assertEqual({m.group for m in user.shown}, {gid}, user.name)
            self.assertEqual([m.seq for m in user.shown], list(range(1, 2 * count + 1)))
            self.assertEqual(len({o.msg_id for o in sent[user.name]}), count)
        # every member acked everything: a receipt, if any were sent, came by now
        db = sqlite3.connect(self.database)
        self.addCleanup(db.close)
        await until(
            lambda: db.execute("SELECT min(acked_seq) FROM inboxes WHERE uid IN (?, ?, ?)",
                               tuple(uids.values())).fetchone()[0] == 2 * count,
            what="every member's acks stored",
        )
        for outs in sent.values():
            self.assertTrue(all_in(outs, STORED), outs)
        self.assert_no_trouble()


class SessionTests(Cluster):
    async def test_resume_on_another_node(self) -> None:
        """Bob's connection to node b drops; while he is away alice (node
        a) sends him 5 messages; bob's client resumes on node a: RESUMED,
        not WELCOME, and it shows the 5 messages (pulled from the inbox)
        once.  Alice sees no PRESENCE at all for the drop and the move; bob's
        HTTP token works on both nodes' HTTP."""
        uids = self.make_users(["alice", "bob"], [("alice", "bob")])
        await self.start_nodes("a", "b")
        alice = self.user("alice", uids["alice"], "a")
        bob = self.user("bob", uids["bob"], "b")
        await alice.client.start()
        await bob.client.start()
        await until(lambda: alice.presence == [(bob.uid, True)], what="bob online for alice")
        bob.hold()
        bob.drop()
        await until(lambda: not bob.client.connected, what="the drop")
        sent = [alice.client.send(bob.uid, f"while away {i}") for i in range(5)]
        await until(lambda: all_stored(sent), what="MSG_As")
        self.assertEqual(bob.shown, [])
        # bob's phone is back on the network, and its client picks node a
        bob.client.state.last_server = self.server("a")
        bob.release()
        await until(lambda: len(bob.shown) == 5, what="bob showing the messages")
        self.assertEqual(bob.client.state.last_server, self.server("a"))
        self.assertEqual((bob.client.logins, bob.client.resumes), (1, 1))
        self.assertEqual(bob.bodies_from(alice), [f"while away {i}" for i in range(5)])
        await until(lambda: all_in(sent, DELIVERED), what="alice's receipts")
        # the session goes on: a message each way, on node a now
        back = bob.client.send(alice.uid, "back")
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
        self.assertEqual(bob.client.duplicates, 0)
        self.assert_no_trouble()

    async def test_presence(self) -> None:
        """Alice on node a sees exactly one PRESENCE true when bob logs in on
        node b; none when bob's connection drops and he resumes on node c;
        exactly one PRESENCE false when bob says BYE.  When bob logs in
        again on b, then on c (which replaces the session on b: no PRESENCE),
        moves back to b by a drop and a RESUME and his connection then drops
        for good, alice sees exactly one PRESENCE false once the linger time
        is over, from node b (node c, where the session began, says
        nothing)."""
        linger = 2
        uids = self.make_users(["alice", "bob"], [("alice", "bob")])
        await self.start_nodes("a", "b", "c", linger=linger)
        alice = self.user("alice", uids["alice"], "a")
        await alice.client.start()
        bob_uid = uids["bob"]
        online, offline = (bob_uid, True), (bob_uid, False)

        # login on b, drop, resume on c, BYE
        wire, welcome = await self.login("b", "bob")
        await until(lambda: alice.presence == [online], what="PRESENCE true")
        await drop(wire)
        dropped = reactor.seconds()
        wire, answer = await self.resume("c", welcome)
        self.assertIsInstance(answer, P.Resumed)
        # past the linger time of the drop: node b has let the session go
        await sleep(max(0.0, dropped + linger + 1 - reactor.seconds()))
        self.assertEqual(alice.presence, [online])
        wire.send(P.Bye())
        await wire.lost
        await until(lambda: alice.presence == [online, offline], what="PRESENCE false")
        await sleep(1)
        self.assertEqual(alice.presence, [online, offline])

        # login on b again; a newer login on c replaces that session
        # (KICKED 1, nothing for alice); drop, resume back on b, drop for
        # good: the linger time runs out on b
        del alice.presence[:]
        old, _ = await self.login("b", "bob")
        await until(lambda: alice.presence == [online], what="PRESENCE true again")
        wire, welcome = await self.login("c", "bob")
        self.assertEqual(await old.next(), P.Kicked(P.KICKED_REPLACED))
        await drop(wire)
        wire, answer = await self.resume("b", welcome)
        self.assertIsInstance(answer, P.Resumed)
        await drop(wire)
        dropped = reactor.seconds()
        await until(lambda: alice.presence == [online, offline], timeout=linger + 5,
                    what="PRESENCE false after the linger time")
        self.assertGreaterEqual(reactor.seconds() - dropped, linger - 0.5)
        # long enough for a second one from any node
        await sleep(linger + 1)
        self.assertEqual(alice.presence, [online, offline])
        expired = f"session of uid={bob_uid} expired".encode()
        self.assertEqual([self.nodes[n].output.count(expired) for n in "abc"], [0, 1, 0])
        self.assert_no_trouble()


class FailureTests(Cluster):
    timeout = 120

    async def test_node_killed(self) -> None:
        """Four users, two on node a and two on node b, each sends 150
        messages to the next one (every message crosses nodes); node a is
        killed with SIGKILL mid-flow.  Its users' clients go to node b and
        RESUME there (no new login); every message that got MSG_A before the
        kill is in its receiver's inbox once, every message is shown exactly
        once and in order, and every sender learns all were delivered (by
        ACK_N, or by asking, for a receipt lost with node a).
        After node_ttl node b has node a's sessions: its IP list drops a's
        server (a new version), a session left on a resumes on b, and one
        whose client never comes back ends after the linger time, its friend
        seeing PRESENCE false once."""
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
        # sessions on a that no client resumes before node b adopts them
        _, dozy = await self.login("a", "dozy")
        await self.login("a", "gone")
        await until(lambda: u0.presence == [(uids["gone"], True)], what="gone online")

        per_sender = 150
        sent: dict[str, list[Outgoing]] = {user.name: [] for user in users}

        def send_some() -> None:
            for i, user in enumerate(users):
                outs = sent[user.name]
                if len(outs) < per_sender:
                    to = users[(i + 1) % len(users)]
                    outs.append(user.client.send(to.uid, f"{user.name} {len(outs)}"))

        pacer = task.LoopingCall(send_some)
        pacer.start(0.01)
        self.addCleanup(lambda: pacer.stop() if pacer.running else None)
        await until(
            lambda: all(sum(o.msg_id is not None for o in outs) >= 30 for outs in sent.values()),
            what="messages stored by both nodes",
        )
        ended = await self.nodes["a"].stop(signal.SIGKILL)
        killed = reactor.seconds()
        self.assertEqual(ended.signal, signal.SIGKILL)
        acknowledged = {
            (name, o.msg_id) for name, outs in sent.items() for o in outs if o.msg_id is not None
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
                len(sent[u.name]) == per_sender
                and all_stored(sent[u.name])
                and len(users[(i + 1) % len(users)].shown) >= per_sender
                for i, u in enumerate(users)
            )

        def progress() -> str:
            return ", ".join(
                f"{u.name}: sent {len(sent[u.name])}, stored "
                f"{sum(o.msg_id is not None for o in sent[u.name])}, delivered "
                f"{sum(o.state == DELIVERED for o in sent[u.name])}, shown {len(u.shown)}"
                for u in users
            )

        try:
            await until(done, timeout=40, what="every message shown and delivered")
        except AssertionError:
            raise AssertionError(progress()) from None
        shown_after = reactor.seconds() - killed
        # receipts: an ACK_R that node a stored just before it died may have
        # taken its ACK_N with it (ACK_N is best effort); the senders that
        # stayed connected ask with POST /v1/status, as the contract says
        db = sqlite3.connect(self.database)
        self.addCleanup(db.close)
        receivers = tuple(u.uid for u in users)
        await until(
            lambda: db.execute("SELECT min(acked_seq) FROM inboxes WHERE uid IN (?, ?, ?, ?)",
                               receivers).fetchone()[0] == per_sender,
            what="every ack stored",
        )
        await sleep(0.5)  # the ACK_Ns of the last acks on their way
        receipts = sum(o.state == DELIVERED for outs in sent.values() for o in outs)

        async def delivered() -> bool:
            for user in users:
                await user.client.refresh_status()
            return all(all_in(outs, DELIVERED) for outs in sent.values())

        await poll(delivered, 10, progress)
        for i, user in enumerate(users):
            receiver = users[(i + 1) % len(users)]
            self.assertEqual(receiver.bodies_from(user),
                             [f"{user.name} {k}" for k in range(per_sender)], receiver.name)
            self.assertEqual([m.seq for m in receiver.shown], list(range(1, per_sender + 1)))
        shown_ids = [(m.sender, m.msg_id) for u in users for m in u.shown]
        self.assertEqual(len(shown_ids), len(set(shown_ids)))
        for name, msg_id in acknowledged:
            entries = db.execute("SELECT count(*) FROM inbox WHERE msg_id = ?", (msg_id,))
            self.assertEqual(entries.fetchone()[0], 1, (name, msg_id))
        self.assertEqual(db.execute("SELECT count(*) FROM messages").fetchone()[0],
                         len(users) * per_sender)

        # node a is dead: b adopts its two sessions left, and drops its server
        b = self.nodes["b"]
        await until(lambda: b"adopted 2 sessions" in b.output,
                    timeout=2 * NODE_TTL + 2, what="node b adopting a's sessions")
        version_after = await self.iplists_show(["b"])
        self.assertNotEqual(version_after, version_before)
        wire, answer = await self.resume("b", dozy)
        self.assertIsInstance(answer, P.Resumed)
        self.assertEqual(answer.uid, uids["dozy"])
        # gone's session ends on b after the linger time: one PRESENCE false
        gone_off = (uids["gone"], False)
        await until(lambda: gone_off in u0.presence, timeout=linger + 5,
                    what="PRESENCE false for the session nobody resumed")
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
        shown twice, every message is delivered, and each node logged the
        outage and its rejoining.  Afterwards Redis knows the sessions
        again: a new message between the nodes comes at once with its
        receipt, bob resumes on node a, and the HTTP tokens of the users of
        node a work on node b."""
        uids = self.make_users(["alice", "bob", "carol"])
        await self.start_nodes("a", "b")
        alice = self.user("alice", uids["alice"], "a")
        carol = self.user("carol", uids["carol"], "a")
        bob = self.user("bob", uids["bob"], "b")
        users = (alice, bob, carol)
        for user in users:
            await user.client.start()
        first = alice.client.send(bob.uid, "before")
        await until(lambda: first.state == DELIVERED, what="a message before the outage")

        restarted = self.redis.restart(down_for=3.0)
        self.addCleanup(lambda: restarted)
        for name, node in self.nodes.items():
            await until(lambda node=node: b"is unreachable" in node.output,
                        what=f"node {name} noticing the outage")
        count = 20
        sent: dict[tuple[str, str], list[Outgoing]] = {}
        for one, other in ((alice, carol), (carol, alice), (alice, bob), (bob, alice)):
            sent[(one.name, other.name)] = [
                one.client.send(other.uid, f"{one.name} to {other.name} {i}")
                for i in range(count)
            ]
        await until(
            lambda: len(carol.bodies_from(alice)) == count
            and len(alice.bodies_from(carol)) == count
            and all(all_stored(outs) for outs in sent.values()),
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
            self.assertEqual([m.seq for m in user.shown], list(range(1, len(user.shown) + 1)))
            self.assertEqual((user.client.logins, user.client.resumes), (1, 0), user.name)
        # Redis knows the sessions again: a message goes at once, with its
        # receipt, and bob can resume on node a
        after = alice.client.send(bob.uid, "after")
        await until(lambda: after.state == DELIVERED, timeout=3, what="a message after")
        bob.hold()
        bob.drop()
        await until(lambda: not bob.client.connected, what="bob's drop")
        bob.client.state.last_server = self.server("a")
        bob.release()
        await until(lambda: bob.client.connected, what="bob on node a")
        self.assertEqual((bob.client.logins, bob.client.resumes), (1, 1))
        # and the HTTP tokens are known again on every node
        for user in users:
            code, body = await self.get("b", "/v1/versions", user.client.token)
            self.assertEqual(code, 200, (user.name, body))

        # receipts: what was acked while Redis was away reached no other
        # node; the senders ask (POST /v1/status), as the contract says
        async def delivered() -> bool:
            for user in users:
                await user.client.refresh_status()
            return all(all_in(outs, DELIVERED) for outs in sent.values())

        await poll(delivered, 10, lambda: f"every message delivered: {sent}")
        self.assert_no_trouble()
        print(f"\nredis: cross-node messages caught up {caught_up_after:.1f}s, both nodes "
              f"rejoined {rejoined_after:.1f}s after it was back")


class PartialOutageTests(Cluster):
    """Node a reaches Redis through a relay that the test cuts: it loses
    Redis while node b keeps it.  ``node_ttl`` is long enough that node b
    does not take node a for dead meanwhile."""

    timeout = 60

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
        hello = alice.client.send(bob, "are you there?")
        await until(lambda: hello.msg_id is not None, what="MSG_A")
        await until(lambda: wire.lost.called
                    or any(isinstance(p, P.MsgN) for p in wire.packets.pending),
                    timeout=15, what="alice's message, or the end of bob's connection")
        return list(wire.packets.pending)

    def logs(self) -> str:
        return "".join(f"\nnode {name}:\n{node.output.decode()}"
                       for name, node in self.nodes.items())

    async def test_move_while_cut_off(self) -> None:
        """Bob, on node a, loses his connection and resumes on node b while
        node a is cut off from Redis; node a is back in Redis a moment
        later (well within the linger time).  Bob's connection on node b
        stays open, and alice's next message reaches him there."""
        relay, uids = await self.start_cut_off(linger=30)
        alice = self.user("alice", uids["alice"], "a")
        await alice.client.start()
        wire, welcome = await self.login("a", "bob")
        await until(lambda: alice.presence == [(uids["bob"], True)], what="bob online")
        wire = await self.cut_and_move(relay, welcome, wire)
        received = await self.after_rejoin(relay, alice, uids["bob"], wire)
        self.assertFalse(wire.lost.called,
                         f"bob's connection to node b was closed; it got {received}"
                         + self.logs())
        self.assertEqual([p.body for p in received if isinstance(p, P.MsgN)],
                         ["are you there?"])
        self.assertEqual(alice.presence, [(uids["bob"], True)])
        self.assert_no_trouble()

    async def test_linger_over_while_cut_off(self) -> None:
        """Bob, on node a, loses his connection and resumes on node b while
        node a is cut off from Redis, and node a stays cut off past the
        linger time of bob's old connection.  His friend alice (node a) sees
        no PRESENCE false (bob never went offline), neither then nor when
        node a is back in Redis; bob's connection on node b stays open and
        alice's next message reaches him there."""
        linger = 2
        relay, uids = await self.start_cut_off(linger=linger)
        alice = self.user("alice", uids["alice"], "a")
        await alice.client.start()
        wire, welcome = await self.login("a", "bob")
        await until(lambda: alice.presence == [(uids["bob"], True)], what="bob online")
        wire = await self.cut_and_move(relay, welcome, wire)
        await sleep(linger + 1)  # past the linger time of the copy on node a
        presence_while_cut = list(alice.presence)
        received = await self.after_rejoin(relay, alice, uids["bob"], wire)
        self.assertEqual(
            (presence_while_cut, alice.presence, wire.lost.called),
            ([(uids["bob"], True)], [(uids["bob"], True)], False),
            "(alice's PRESENCE while a was cut off, afterwards, bob's connection closed); "
            f"bob received {received}" + self.logs(),
        )
        self.assertEqual([p.body for p in received if isinstance(p, P.MsgN)],
                         ["are you there?"])
        self.assert_no_trouble()


class IPListTests(Cluster):
    async def test_iplist_follows_the_nodes(self) -> None:
        """GET /v1/iplist on every node lists every live node's access
        server with the weight configured on that node, with the same
        version everywhere; the version changes when node c joins, and when
        it stops (SIGTERM) it goes back to the version of the list without
        c.  Carol, on node c when it stops, carries on on another node with
        her session (RESUMED), and her friend alice sees no PRESENCE."""
        weights = {"a": 1, "b": 2, "c": 5}
        uids = self.make_users(["alice", "carol"], [("alice", "carol")])
        await self.start_nodes("a", "b", weights=weights)
        two = await self.iplists_show(["a", "b"])
        await self.start_nodes("c", weights=weights)
        three = await self.iplists_show(["a", "b", "c"])
        self.assertNotEqual(three, two)
        alice = self.user("alice", uids["alice"], "a")
        carol = self.user("carol", uids["carol"], "c")
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
        hello = alice.client.send(carol.uid, "still there?")
        await until(lambda: hello.state == DELIVERED, what="a message to carol")
        self.assertEqual(carol.bodies_from(alice), ["still there?"])
        self.assertEqual(alice.presence, [(carol.uid, True)])
        self.assert_no_trouble()
