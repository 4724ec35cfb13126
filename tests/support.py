"""Test doubles shared by the unit tests: no threads, no sockets, no real time."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from im58d.access.protocol import AccessFactory, AccessProtocol
from im58d.logic.auth import Authenticator, LoginThrottle
from im58d.logic.messages import Messenger
from im58d.logic.passwords import hash_password, verify_password
from im58d.logic.presence import Presence
from im58d.logic.sessions import SessionManager
from im58d.proof import resume_mac
from im58d.routing.iplist import AccessServer, IPList
from im58d.routing.local import LocalRouter
from im58d.store.accounts import add_user_txn
from im58d.store.sqlite import SQLiteStore
from im58d.web.root import make_site
from im58d.wire import Decoder, encode
from im58d.wire import packets as P

# scrypt at a tiny cost: the tests check behaviour, not the hash's strength
CHEAP_N = 16
# the clock's start: a realistic Unix time, as ts fields would carry it
NOW = 1_800_000_000
# the device id of a test's connections, unless it names another
DEVICE = b"test-device-0001"


def device_id(n: int) -> bytes:
    """The 16-byte id of a test's n-th device (``device_id(1)`` is not DEVICE)."""
    return f"device-{n:09d}".encode("ascii")


def resume_for(welcome: Any, ts: int = NOW, nonce: bytes = b"n0nce-01") -> P.Resume:
    """A RESUME for the session of ``welcome`` (a WELCOME, or anything with
    its session_id and session_key), with the proof of PROTOCOL.md 1.3."""
    mac = resume_mac(welcome.session_key, welcome.session_id, ts, nonce)
    return P.Resume(welcome.session_id, ts, nonce, mac)


class ImmediateThread:
    """A DatabaseThread stand-in that does each job at once, in the caller's thread."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, fn: Any, *args: Any) -> Deferred[Any]:
        try:
            return succeed(fn(*args))
        except BaseException:
            return fail()


def immediate_verify(password: str, encoded: str) -> Deferred[bool]:
    return succeed(verify_password(password, encoded))


def result_of(d: Deferred[Any]) -> Any:
    """The result a Deferred has already (its failure raised); an
    AssertionError when it has none yet."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has no result yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def memory_store(reactor: MemoryReactorClock, path: str = ":memory:") -> SQLiteStore:
    """A started SQLiteStore whose database work runs synchronously."""
    store = SQLiteStore(path, reactor, thread=ImmediateThread())
    store.start()
    return store


def add_user(store: SQLiteStore, name: str, password: str = "pw") -> int:
    """Create a user straight on the store's connection (no queue)."""
    db = store._db
    assert db is not None
    return add_user_txn(db, name, hash_password(password, n=CHEAP_N), 0)


class Harness:
    """The access layer wired to an in-memory store and a clock."""

    def __init__(self, **settings: Any) -> None:
        reactor = settings.pop("reactor", None)
        if reactor is None:
            reactor = MemoryReactorClock()
            reactor.advance(NOW)
        self.reactor = reactor
        store = settings.pop("store", None)  # another node's, shared
        path = settings.pop("path", ":memory:")
        self.store = store if store is not None else memory_store(self.reactor, path)
        router = settings.pop("router", None)  # a router of several nodes
        self.router: Any = router if router is not None else LocalRouter()
        self.throttle = LoginThrottle(self.reactor)
        self.auth = Authenticator(self.store, self.throttle, immediate_verify)
        self.presence = Presence(self.router, self.store)
        self.sessions = SessionManager(
            self.router,
            self.store,
            self.auth,
            self.reactor,
            self.presence,
            heartbeat=settings.pop("heartbeat", 240),
            linger=settings.pop("linger", 300),
            max_devices=settings.pop("max_devices", 5),
            expire_days=settings.pop("expire_days", 90),
            iplist_version=lambda: 7,
        )
        self.messenger = Messenger(
            self.store,
            self.router,
            self.reactor,
            max_body=settings.pop("max_body", 4096),
            friends_only=settings.pop("friends_only", False),
            retransmit=settings.pop("retransmit", 10),
            gather=settings.pop("gather", 0.0),
        )
        self.factory = AccessFactory(self.sessions, self.messenger, self.reactor, **settings)
        self.iplist = IPList([AccessServer("127.0.0.1", 5858)])
        self.site = make_site(self.iplist, self.sessions, self.store, self.reactor)
        self.treq: Any = StubTreq(self.site.resource)

    @property
    def db(self) -> Any:
        """The store's database (a ``sqlite_utils.Database``), to look or
        change things behind the daemon's back, as im58d-admin does."""
        db = self.store._db
        assert db is not None
        return db

    def device_of(self, uid: int, device: bytes = DEVICE) -> Any:
        """The ``Device`` online here of the user's device with that id, or None."""
        user = self.router.user(uid)
        if user is None:
            return None
        for held in user.devices.values():
            if held.device_id == device:
                return held
        return None

    def stop(self) -> None:
        """What the daemon does when it stops: pending commits finish,
        KICKED 3 to every connection, and the store closes.  The sessions
        stay in the database, their devices online there."""
        self.messenger.drain()
        self.turn()
        self.factory.kick_all(P.KICKED_SHUTDOWN)
        self.turn()
        result_of(self.store.stop())

    def restarted(self, stop: bool = True, **settings: Any) -> Harness:
        """Stop this daemon (``stop``; without ``stop`` it dies: nothing more
        happens in it) and start another on the same database file, its
        clock at this one's time.  The new one has not restored the
        sessions yet: ``sessions.restore()`` is what its start does."""
        assert self.store.path != ":memory:", "a restart needs Harness(path=FILE)"
        if stop:
            self.stop()
        reactor = MemoryReactorClock()
        reactor.advance(self.reactor.seconds())
        return Harness(reactor=reactor, path=self.store.path, **settings)

    def connect(self, host: str = "10.0.0.1") -> Client:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=_Address(host))
        protocol.makeConnection(transport)
        return Client(self, protocol, transport)

    def turn(self) -> None:
        """Run what one reactor turn would: store batches, then the outbox."""
        for _ in range(10):
            self.reactor.advance(0)

    def request(
        self, method: str, path: str, headers: dict[str, list[str]] | None = None,
        data: bytes | None = None, treq: Any = None,
    ) -> tuple[Any, bytes]:
        """An HTTP request to the site (or to ``treq``'s), answered in
        memory: (response, body as received)."""
        treq = treq or self.treq
        d = treq.request(method, "http://im58d.test" + path, headers=headers or {}, data=data)
        self.turn()
        treq.flush()
        responses: list[Any] = []
        d.addCallback(responses.append)
        assert responses, f"no response to {method} {path}"
        response = responses[0]
        content: list[bytes] = []
        response.content().addCallback(content.append)
        treq.flush()
        return response, content[0]

    def http(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        """An HTTP request to the site, answered in memory: (status, JSON or None)."""
        headers = {"Authorization": [f"Bearer {token}"]} if token else {}
        data = json.dumps(body).encode() if body is not None else None
        response, content = self.request(method, path, headers, data)
        return response.code, json.loads(content) if content else None


class _Address:
    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 40000


class Client:
    """A test's view of one connection: packets in, packets out."""

    def __init__(self, harness: Harness, protocol: AccessProtocol, transport: StringTransport):
        self.harness = harness
        self.protocol = protocol
        self.transport = transport
        self.decoder = Decoder()

    def send(self, *packets: Any) -> None:
        self.send_bytes(b"".join(encode(p) for p in packets))

    def send_bytes(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        self.harness.turn()

    def received(self) -> list[Any]:
        """The packets written to the client since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return list(self.decoder.feed(data))

    def login(self, user: str, password: str = "pw", device: bytes = DEVICE) -> P.Welcome:
        """LOGIN: the WELCOME (and the ONLINE that follows it)."""
        self.send(P.Login(user, password, device, "test device"))
        packets = self.received()
        assert len(packets) == 2 and isinstance(packets[0], P.Welcome), packets
        assert isinstance(packets[1], P.Online), packets
        return packets[0]

    def resume(self, welcome: Any, ts: int | None = None, nonce: bytes = b"n0nce-01") -> list[Any]:
        """RESUME the session of ``welcome`` (at the clock's time unless
        ``ts`` is given): the packets received in answer."""
        if ts is None:
            ts = int(self.harness.reactor.seconds())
        self.send(resume_for(welcome, ts, nonce))
        return self.received()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting) or self.transport.disconnected

    def drop(self) -> None:
        """The TCP connection breaks (no BYE)."""
        self.protocol.connectionLost(Failure(ConnectionError("dropped")))
