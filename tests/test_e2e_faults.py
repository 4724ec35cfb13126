"""End to end through a network that breaks: nothing lost, nothing twice."""

from __future__ import annotations

import os
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from im58d.client import DELIVERED, Client, ClientState, Message, Outgoing

from .e2e import Daemon, admin, free_port, until
from .faults import FaultyProxy


class FaultyNetworkTests(TestCase):
    timeout = 240

    @inlineCallbacks
    def test_thousand_messages_through_a_faulty_network(self) -> Any:
        """Two clients exchange 1,000 messages through a proxy that cuts
        connections at random moments, cuts some in the middle of a frame and
        stalls others: each side shows every message of the other exactly
        once, in order, knows all its own were delivered, and neither saw the
        other go offline (each drop was resumed)."""
        access, http, proxy_port = free_port(), free_port(), free_port()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "im58d.ini")
        with open(config, "w") as f:
            f.write(f"[iplist]\nservers = 127.0.0.1:{proxy_port}\n")
        daemon = Daemon(directory, extra=["--config", config], ports=(access, http))
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        for name in ("alice", "bob"):
            out, err, code = yield admin(daemon.database, "user", "add", name,
                                         "--password", "pw")
            self.assertEqual(code, 0, err)
        yield admin(daemon.database, "friend", "add", "alice", "bob")
        proxy = FaultyProxy(reactor, access, seed=58)
        yield proxy.listen(proxy_port)
        self.addCleanup(proxy.stop)

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        shown: dict[str, list[Message]] = {"alice": [], "bob": []}
        offline: list[tuple[str, int]] = []
        clients: dict[str, Client] = {}
        def presence_of(name: str) -> Any:
            def on_presence(uid: int, online: bool) -> None:
                if not online:
                    offline.append((name, uid))

            return on_presence

        for name in ("alice", "bob"):
            client = Client(
                reactor, None, None, f"http://127.0.0.1:{http}", name, "pw",
                state=ClientState(next_cmid=1), on_message=shown[name].append,
                on_presence=presence_of(name),
                http=HTTPClient(Agent(reactor, pool=pool)),
                resend_after=1.0, min_backoff=0.05, max_backoff=0.5,
            )
            self.addCleanup(client.stop)
            clients[name] = client
            yield client.start()
        uids = {name: client.uid or 0 for name, client in clients.items()}
        self.assertEqual(clients["alice"].state.last_server, ("127.0.0.1", proxy_port, False))

        per_side = 500
        sent: dict[str, list[Outgoing]] = {"alice": [], "bob": []}

        def send() -> None:
            for name, other in (("alice", "bob"), ("bob", "alice")):
                if len(sent[name]) < per_side:
                    body = f"{name} {len(sent[name])}"
                    sent[name].append(clients[name].send(uids[other], body))

        pacer = task.LoopingCall(send)
        pacer.start(0.01)
        self.addCleanup(lambda: pacer.stop() if pacer.running else None)

        def done() -> bool:
            return all(
                len(sent[name]) == per_side
                and all(o.state == DELIVERED for o in sent[name])
                and len(shown[other]) >= per_side
                for name, other in (("alice", "bob"), ("bob", "alice"))
            )

        def progress() -> str:
            return (f"sent {[len(v) for v in sent.values()]}, delivered "
                    f"{[sum(o.state == DELIVERED for o in v) for v in sent.values()]}, shown "
                    f"{[len(v) for v in shown.values()]}, cuts {proxy.cuts}")

        try:
            yield ensureDeferred(until(done, timeout=180, what="all messages"))
        except AssertionError:
            raise AssertionError(progress()) from None
        for name, other in (("alice", "bob"), ("bob", "alice")):
            self.assertEqual([m.body for m in shown[other]],
                             [f"{name} {i}" for i in range(per_side)])
        self.assertEqual(offline, [])
        # the network really was bad
        self.assertGreater(proxy.cuts, 5)
        self.assertGreater(proxy.mid_frame_cuts, 0)
        self.assertGreater(proxy.stalls, 0)
        self.assertGreater(clients["alice"].resumes + clients["bob"].resumes, 5)
