"""Running the real daemon (``twistd -n im58d``) and talking to it over sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from im58d.wire import Decoder, encode

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
        self.ports: dict[str, int] = {}
        self.ready: Deferred[Daemon] = Deferred()
        self.ended: Deferred[Ended] = Deferred()
        self.running = False

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
        self.output = b""
        self.ports = {}
        self.ready = Deferred()
        self.ended = Deferred()
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
