"""A real ``redis-server`` for the tests: on a free port, in a directory of its
own, with no persistence; stopped, killed or restarted on the same port.
And a ``Relay`` through which one node reaches it, for cutting that node off."""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from .e2e import TIMEOUT, free_port

HOST = "127.0.0.1"

REDIS_SERVER = shutil.which("redis-server")
SKIP = None if REDIS_SERVER else "redis-server is not on PATH (apt-get install redis-server)"


class RedisServer(ProcessProtocol):
    """``redis-server`` on HOST:``port``."""

    def __init__(self, directory: str, port: int = 0) -> None:
        self.directory = os.path.abspath(directory)
        self.port = port or free_port()
        self.output = b""
        self.running = False
        self.ended: Deferred[None] = Deferred()

    @property
    def endpoint(self) -> str:
        """The ``[routing] redis`` value for the daemon."""
        return f"tcp:{HOST}:{self.port}"

    @inlineCallbacks
    def start(self) -> Any:
        """Start it and wait until it answers."""
        assert REDIS_SERVER is not None
        os.makedirs(self.directory, exist_ok=True)
        self.output = b""
        self.ended = Deferred()
        argv = [
            REDIS_SERVER, "--port", str(self.port), "--bind", HOST,
            "--save", "", "--appendonly", "no", "--dir", self.directory,
        ]
        reactor.spawnProcess(self, REDIS_SERVER, argv, env={}, path=self.directory)
        self.running = True
        deadline = reactor.seconds() + TIMEOUT
        while True:
            try:
                yield connectProtocol(
                    TCP4ClientEndpoint(reactor, HOST, self.port), _Probe()
                ).addCallback(lambda p: p.transport.loseConnection())
                return self
            except Exception:
                if not self.running or reactor.seconds() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start:\n{self.output.decode()}"
                    ) from None
                yield deferLater(reactor, 0.05)

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        self.ended.callback(None)

    def stop(self, sig: int = signal.SIGKILL) -> Deferred[None]:
        if self.running:
            self.transport.signalProcess(sig)  # type: ignore[union-attr]
        return self.ended

    @inlineCallbacks
    def restart(self, down_for: float = 0.0) -> Any:
        """Kill it (its data goes with it), wait ``down_for`` seconds, start
        it again on the same port."""
        yield self.stop()
        if down_for:
            yield deferLater(reactor, down_for)
        yield self.start()


class _Probe(Protocol):
    pass


class Relay(Factory):
    """A TCP relay to Redis.  ``cut`` breaks every connection through it and
    refuses new ones (the port is closed) until ``listen`` again, on the same
    port; ``orphan`` makes Redis forget one connection while the node's
    side of it stays open and hears nothing more (a half-open connection, as
    a firewall that dropped an idle connection leaves it)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.listener: Any = None
        self.links: list[_Outer] = []

    @property
    def endpoint(self) -> str:
        return f"tcp:{HOST}:{self.port}"

    async def listen(self) -> None:
        endpoint = TCP4ServerEndpoint(reactor, self.port, interface=HOST)
        self.listener = await endpoint.listen(self)
        self.port = self.listener.getHost().port

    def buildProtocol(self, addr: Any) -> _Outer:
        return _Outer(self)

    def cut(self) -> Deferred[None]:
        listener, self.listener = self.listener, None
        for link in list(self.links):
            link.abort()
        if listener is None:
            return succeed(None)
        d: Deferred[None] = listener.stopListening()
        return d

    def subscriber(self) -> _Outer:
        """The link that carries the node's subscription."""
        links = [link for link in self.links if b"SUBSCRIBE" in link.sent]
        assert len(links) == 1, links
        return links[0]


class _Outer(Protocol):
    """A node's connection to the relay."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.inner: _Inner | None = None
        self.pending: list[bytes] = []
        self.sent = b""
        self.closed = False
        self.orphaned = False

    def connectionMade(self) -> None:
        if self.relay.listener is None:
            self.abort()
            return
        self.relay.links.append(self)
        d = connectProtocol(TCP4ClientEndpoint(reactor, HOST, self.relay.target), _Inner(self))
        d.addCallbacks(self._connected, lambda _: self.abort())

    def _connected(self, inner: _Inner) -> None:
        self.inner = inner
        transport: Any = inner.transport
        if self.closed:
            transport.abortConnection()
            return
        for data in self.pending:
            transport.write(data)
        self.pending = []

    def dataReceived(self, data: bytes) -> None:
        if len(self.sent) < 4096:
            self.sent += data
        if self.orphaned:
            return
        if self.inner is None:
            self.pending.append(data)
        else:
            transport: Any = self.inner.transport
            transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        if self in self.relay.links:
            self.relay.links.remove(self)
        if self.inner is not None:
            transport: Any = self.inner.transport
            transport.abortConnection()

    def abort(self) -> None:
        transport: Any = self.transport
        transport.abortConnection()

    def orphan(self) -> None:
        self.orphaned = True
        if self.inner is not None:
            transport: Any = self.inner.transport
            transport.abortConnection()


class _Inner(Protocol):
    """The relay's connection to Redis."""

    def __init__(self, outer: _Outer) -> None:
        self.outer = outer

    def dataReceived(self, data: bytes) -> None:
        if not self.outer.orphaned:
            transport: Any = self.outer.transport
            transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.outer.orphaned and not self.outer.closed:
            self.outer.abort()
