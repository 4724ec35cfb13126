"""HTTP clients of ``im58d-bench`` that count what crosses their sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer


class WireMeter:
    """Bytes through the bench's HTTP sockets, both ways, and requests made."""

    def __init__(self) -> None:
        self.up = 0
        self.down = 0
        self.requests = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.requests, self.up, self.down


class _CountingWrapper(ProtocolWrapper):
    """Counts every byte written to and read from the socket: the raw HTTP
    messages, request and status lines, headers and (chunked, gzipped or
    not) bodies."""

    factory: _CountingFactory

    def write(self, data: bytes) -> None:
        self.factory.meter.up += len(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        data = list(data)
        self.factory.meter.up += sum(len(chunk) for chunk in data)
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        self.factory.meter.down += len(data)
        super().dataReceived(data)


class _CountingFactory(WrappingFactory):
    protocol = _CountingWrapper

    def __init__(self, wrapped: Any, meter: WireMeter) -> None:
        super().__init__(wrapped)
        self.meter = meter


@implementer(IStreamClientEndpoint)
class _CountingEndpoint:
    def __init__(self, endpoint: Any, meter: WireMeter) -> None:
        self.endpoint = endpoint
        self.meter = meter

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self.endpoint.connect(_CountingFactory(factory, self.meter))
        return d.addCallback(lambda wrapper: wrapper.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class CountingEndpoints:
    def __init__(self, reactor: Any, meter: WireMeter) -> None:
        self.reactor = reactor
        self.meter = meter

    def endpointForURI(self, uri: Any) -> _CountingEndpoint:
        endpoint = TCP4ClientEndpoint(self.reactor, uri.host.decode("ascii"), uri.port)
        return _CountingEndpoint(endpoint, self.meter)


@implementer(IAgent)
class MeteredAgent:
    """Counts requests; without gzip, drops the ``Accept-Encoding`` that treq
    always adds, so that the server answers uncompressed."""

    def __init__(self, agent: Any, meter: WireMeter, gzip: bool) -> None:
        self.agent = agent
        self.meter = meter
        self.gzip = gzip

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> defer.Deferred[Any]:
        self.meter.requests += 1
        if not self.gzip and headers is not None:
            headers.removeHeader(b"accept-encoding")
        d: defer.Deferred[Any] = self.agent.request(method, uri, headers, bodyProducer)
        return d


class Session:
    """What ``Sync`` needs of a logged-in client."""

    def __init__(self, http: Any, http_url: str, token: str, uid: int) -> None:
        self.http = http
        self.http_url = http_url
        self.token = token
        self.uid = uid


def metered_agent(reactor: Any, meter: WireMeter, gzip: bool
                  ) -> tuple[MeteredAgent, HTTPConnectionPool]:
    """An agent on one persistent connection pool whose bytes ``meter``
    counts; with ``gzip`` False it asks for uncompressed answers."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent.usingEndpointFactory(reactor, CountingEndpoints(reactor, meter), pool)
    return MeteredAgent(agent, meter, gzip), pool
