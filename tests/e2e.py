"""Running the real daemon (``twistd -n im58d``) and talking to it over sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from im58d.proof import resume_mac
from im58d.wire import Decoder, encode
from im58d.wire import packets as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 20.0


def environment() -> dict[str, str]:
    """The checkout first on the path, so the daemon and its plugin are this code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def admin(database: str, *args: str) -> Deferred[tuple[bytes, bytes, int]]:
    """Run ``im58d-admin --database DATABASE ARGS`` from this checkout."""
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        sys.executable,
        ["-m", "im58d.admin", "--database", database, *args],
        env=environment(),
        path=ROOT,
    )
    return d


class Ended(NamedTuple):
    code: int | None
    signal: int | None

    @property
    def clean(self) -> bool:
        """Exit 0, or the SIGTERM re-raised by Twisted after a clean shutdown."""
        return self.code == 0 or self.signal == signal.SIGTERM


class Daemon(ProcessProtocol):
    """``twistd -n im58d`` on free loopback ports, in a directory of its own."""

    def __init__(
        self, directory: str, extra: Sequence[str] = (), ports: tuple[int, int] = (0, 0)
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.extra = list(extra)
        self.fixed_ports = ports
        self.output = b""
        # the output of every run so far (``output`` is the current run's)
        self.all_output = b""
        self.ports: dict[str, int] = {}
        self.ready: Deferred[Daemon] = Deferred()
        self.ended: Deferred[Ended] = Deferred()
        self.running = False
        # reactor.seconds() when the current run was started
        self.started_at = 0.0
        self.args: list[str] | None = None

    @property
    def database(self) -> str:
        return os.path.join(self.directory, "im58d.sqlite")

    def start(self, args: Sequence[str] | None = None) -> Deferred[Daemon]:
        os.makedirs(self.directory, exist_ok=True)
        if args is None:
            access, http = self.fixed_ports
            args = [
                "--database", self.database,
                "--access", f"tcp:{access}:interface=127.0.0.1",
                "--http", f"tcp:{http}:interface=127.0.0.1",
            ]
        self.args = list(args)
        self.output = b""
        self.ports = {}
        self.ready = Deferred()
        self.ended = Deferred()
        self.started_at = reactor.seconds()
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile", "", "im58d", *args, *self.extra,
        ]
        reactor.spawnProcess(self, sys.executable, argv, env=environment(), path=self.directory)
        self.running = True
        self.ready.addTimeout(TIMEOUT, reactor)
        return self.ready

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self.all_output += data
        for kind, port in re.findall(rb"(AccessFactory|Site) starting on (\d+)", self.output):
            self.ports[kind.decode()] = int(port)
        if len(self.ports) == 2 and not self.ready.called:
            self.ready.callback(self)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        value = reason.value
        ended = Ended(getattr(value, "exitCode", None), getattr(value, "signal", None))
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"daemon ended ({ended}):\n{self.output.decode()}"))
        self.ended.callback(ended)

    @property
    def access_port(self) -> int:
        return self.ports["AccessFactory"]

    @property
    def http_port(self) -> int:
        return self.ports["Site"]

    def stop(self, sig: int = signal.SIGTERM) -> Deferred[Ended]:
        if self.running:
            self.transport.signalProcess(sig)  # type: ignore[union-attr]
        return self.ended

    @inlineCallbacks
    def restart(self, sig: int = signal.SIGTERM) -> Any:
        """Stop the daemon with ``sig`` and start it again with the same
        arguments (the same directory and database; new free ports unless
        fixed ones were given): fires with the ``Ended`` of the first run."""
        ended = yield self.stop(sig)
        yield self.start(self.args)
        return ended

    @inlineCallbacks
    def cleanup(self) -> Any:
        """For addCleanup: kill the daemon if the test left it running."""
        if self.running:
            self.transport.signalProcess(signal.SIGKILL)  # type: ignore[union-attr]
            yield self.ended


class PacketClient(Protocol):
    """A bare wire client: send packets, await the ones that come back."""

    def __init__(self) -> None:
        self.decoder = Decoder()
        self.packets: DeferredQueue[Any] = DeferredQueue()
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        for packet in self.decoder.feed(data):
            self.packets.put(packet)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)

    def send(self, *packets: Any) -> None:
        self.transport.write(b"".join(encode(p) for p in packets))  # type: ignore[union-attr]

    def next(self) -> Deferred[Any]:
        d = self.packets.get()
        d.addTimeout(TIMEOUT, reactor)
        return d

    def drop(self) -> None:
        """The TCP connection breaks (no BYE)."""
        self.transport.abortConnection()  # type: ignore[union-attr]

    def expect(self, kind: type) -> Deferred[Any]:
        """The next packet, which must be a ``kind``."""
        async def expect() -> Any:
            packet = await self.next()
            if not isinstance(packet, kind):
                raise AssertionError(f"expected {kind.__name__}, got {packet!r}")
            return packet

        return Deferred.fromCoroutine(expect())

    def login(
        self, user: str, password: str, device_id: bytes | None = None,
        device_name: str | None = "e2e",
    ) -> Deferred[tuple[P.Welcome, P.Online]]:
        """LOGIN (a new device unless ``device_id`` is given): the WELCOME
        and the ONLINE that follows it."""
        async def login() -> tuple[P.Welcome, P.Online]:
            self.send(P.Login(user, password, device_id or new_device(), device_name))
            welcome = await self.expect(P.Welcome)
            online = await self.expect(P.Online)
            return welcome, online

        return Deferred.fromCoroutine(login())

    def nothing_pending(self) -> Deferred[None]:
        """PING: the next packet must be its PONG (nothing else came and
        nothing is queued before it)."""
        async def barrier() -> None:
            self.send(P.Ping())
            packet = await self.next()
            if packet != P.Pong():
                raise AssertionError(f"expected nothing before PONG, got {packet!r}")

        return Deferred.fromCoroutine(barrier())


def new_device() -> bytes:
    """A device id: 16 random bytes, as an app makes once per installation."""
    return os.urandom(16)


_last_nonce = 0


def nonce_now() -> int:
    """A RESUME nonce as clients make it: max(last + 1, the time in
    microseconds), so it grows across restarts of the client and of the
    daemon, and from call to call."""
    global _last_nonce
    _last_nonce = max(_last_nonce + 1, time.time_ns() // 1000)
    return _last_nonce


def resume_for(session: Any, nonce: int | None = None, ts: int | None = None) -> P.Resume:
    """A RESUME proving the key of ``session`` (a WELCOME, or anything with
    ``session_id`` and ``session_key``): nonce ``nonce`` (8 bytes big-endian;
    default ``nonce_now()``), at ``ts`` (default now)."""
    ts = int(time.time()) if ts is None else ts
    raw = (nonce_now() if nonce is None else nonce).to_bytes(8, "big")
    mac = resume_mac(session.session_key, session.session_id, ts, raw)
    return P.Resume(session.session_id, ts, raw, mac)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition: Any, timeout: float = TIMEOUT, what: str = "") -> None:
    """Wait, polling every 50 ms, until ``condition()`` holds (real processes
    leave no clock to advance)."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await deferLater(reactor, 0.05)


def connect(port: int) -> Deferred[PacketClient]:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    d: Deferred[PacketClient] = connectProtocol(endpoint, PacketClient())
    return d
