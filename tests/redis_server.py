"""A real ``redis-server`` for the tests: on a free port, in a directory of its
own, with no persistence; stopped, killed or restarted on the same port."""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from .e2e import TIMEOUT, free_port

REDIS_SERVER = shutil.which("redis-server")
SKIP = None if REDIS_SERVER else "redis-server is not on PATH (apt-get install redis-server)"


class RedisServer(ProcessProtocol):
    """``redis-server`` on 127.0.0.1:``port``."""

    def __init__(self, directory: str, port: int = 0) -> None:
        self.directory = os.path.abspath(directory)
        self.port = port or free_port()
        self.output = b""
        self.running = False
        self.ended: Deferred[None] = Deferred()

    @property
    def endpoint(self) -> str:
        """The ``[routing] redis`` value for the daemon."""
        return f"tcp:127.0.0.1:{self.port}"

    @inlineCallbacks
    def start(self) -> Any:
        """Start it and wait until it answers."""
        assert REDIS_SERVER is not None
        os.makedirs(self.directory, exist_ok=True)
        self.output = b""
        self.ended = Deferred()
        argv = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self.directory,
        ]
        reactor.spawnProcess(self, REDIS_SERVER, argv, env={}, path=self.directory)
        self.running = True
        deadline = reactor.seconds() + TIMEOUT
        while True:
            try:
                yield connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), _Probe()
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
