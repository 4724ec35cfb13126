"""A TCP proxy for the tests that breaks the connections it carries.

Between clients and the daemon, on loopback, it relays bytes both ways and,
driven by a seeded random generator, stalls a connection for a while (what
it holds is delivered afterwards), cuts connections at random moments, and
cuts some in the middle of a frame (part of a write goes through, the rest
is lost).
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


class _Side(Protocol):
    def __init__(self, link: _Link, name: str) -> None:
        self.link = link
        self.name = name

    def dataReceived(self, data: bytes) -> None:
        self.link.relay(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.link.lost(self)


class _Link:
    """One client connection and its connection to the server."""

    def __init__(self, proxy: FaultyProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, "client")
        self.server: _Side | None = None
        self.held: list[tuple[_Side, bytes]] = []
        self.stalled = False
        self.cut = False
        # bytes this connection carries before it is cut
        self.budget = proxy.rng.randint(*proxy.cut_after)

    def connected(self, server: _Side) -> None:
        self.server = server
        if self.cut:
            server.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._release()

    def relay(self, side: _Side, data: bytes) -> None:
        if self.cut:
            return
        if self.stalled or self.server is None:
            self.held.append((side, data))
            return
        rng = self.proxy.rng
        # once stopped, no new stall: its timer would outlive the test
        if not self.proxy.stopped and rng.random() < self.proxy.stall_chance:
            self.proxy.stalls += 1
            self.stalled = True
            self.held.append((side, data))
            self.proxy.later(rng.uniform(*self.proxy.stall_for), self._unstall)
            return
        self.budget -= len(data)
        if self.budget <= 0:
            # the cut falls inside this write: part of it goes through
            keep = rng.randrange(len(data))
            if 0 < keep:
                self.proxy.mid_frame_cuts += 1
            self._forward(side, data[:keep])
            self.break_off()
            return
        self._forward(side, data)

    def _forward(self, side: _Side, data: bytes) -> None:
        other = self.server if side is self.client else self.client
        if data and other is not None and other.transport is not None:
            other.transport.write(data)

    def _unstall(self) -> None:
        self.stalled = False
        self._release()

    def _release(self) -> None:
        held, self.held = self.held, []
        for side, data in held:
            self.relay(side, data)

    def break_off(self) -> None:
        if self.cut:
            return
        self.cut = True
        self.proxy.cuts += 1
        for side in (self.client, self.server):
            transport: Any = side.transport if side is not None else None
            if transport is not None:
                transport.abortConnection()

    def lost(self, side: _Side) -> None:
        if not self.cut:  # one end closed: close the other
            self.cut = True
            other = self.server if side is self.client else self.client
            if other is not None and other.transport is not None:
                other.transport.loseConnection()


class FaultyProxy(Factory):
    """Listens on ``port`` and relays each connection to ``target``."""

    def __init__(
        self,
        reactor: Any,
        target: int,
        seed: int,
        cut_after: tuple[int, int] = (200, 4000),
        stall_chance: float = 0.02,
        stall_for: tuple[float, float] = (0.1, 1.5),
    ) -> None:
        self.reactor = reactor
        self.target = target
        self.rng = random.Random(seed)
        self.cut_after = cut_after
        self.stall_chance = stall_chance
        self.stall_for = stall_for
        self.cuts = 0
        self.mid_frame_cuts = 0
        self.stalls = 0
        self.connections = 0
        self.port: Any = None
        self.stopped = False
        self._calls: list[Any] = []

    def listen(self, port: int) -> Any:
        d = TCP4ServerEndpoint(self.reactor, port, interface="127.0.0.1").listen(self)
        return d.addCallback(lambda listening: setattr(self, "port", listening))

    def buildProtocol(self, addr: Any) -> Protocol:
        self.connections += 1
        link = _Link(self)
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.target)
        d = connectProtocol(endpoint, _Side(link, "server"))
        d.addCallbacks(link.connected, lambda failure: link.break_off())
        return link.client

    def later(self, delay: float, f: Any) -> None:
        self._calls = [call for call in self._calls if call.active()]
        self._calls.append(self.reactor.callLater(delay, f))

    def stop(self) -> Any:
        self.stopped = True
        for call in self._calls:
            if call.active():
                call.cancel()
        return self.port.stopListening() if self.port is not None else None
