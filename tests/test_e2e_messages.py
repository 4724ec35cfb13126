"""End to end: the message flow between real clients and the real daemon."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from im58d.client import DELIVERED, STORED, Client, ClientState, Message, Outgoing
from im58d.client.client import _Wire
from im58d.wire import Decoder, encode
from im58d.wire import packets as P

from .e2e import ROOT, Daemon, admin, connect, environment, free_port, until


class Recorder:
    """The frames each real client wrote and read, in order."""

    def __init__(self, test: TestCase) -> None:
        self.frames: dict[str, list[tuple[str, bytes]]] = {}
        self.decoders: dict[int, Decoder] = {}
        recorder = self
        received = _Wire.dataReceived
        sent = _Wire.send

        def data_received(wire: _Wire, data: bytes) -> None:
            recorder._log(wire, "in", data)
            received(wire, data)

        def send(wire: _Wire, *packets: Any) -> None:
            recorder._log(wire, "out", b"".join(encode(p) for p in packets))
            sent(wire, *packets)

        test.patch(_Wire, "dataReceived", data_received)
        test.patch(_Wire, "send", send)

    def _log(self, wire: _Wire, way: str, data: bytes) -> None:
        # split the stream into frames (a read may hold several)
        decoder = self.decoders.setdefault(id(wire) * 2 + (way == "in"), Decoder())
        buffered = decoder._buf + data if decoder._buf else data
        pos = 0
        for _ in decoder.feed(data):
            n, head = buffered[pos], pos + 1
            if n >= 0x80:  # frames here are short; a longer prefix is rare
                n, head = _varint(buffered, pos)
            self.frames.setdefault(wire.client.user, []).append((way, buffered[pos : head + n]))
            pos = head + n


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, pos


class DaemonWithUsers(TestCase):
    """A daemon on fresh ports with the users alice and bob (password "pw")."""

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.daemon = Daemon(self.mktemp(), ports=(free_port(), free_port()))
        self.addCleanup(self.daemon.cleanup)
        yield self.daemon.start()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.uids = {}
        for name in ("alice", "bob"):
            out, err, code = yield admin(self.daemon.database, "user", "add", name,
                                         "--password", "pw")
            self.assertEqual(code, 0, err)
            self.uids[name] = int(out)

    def client(self, name: str, **kwargs: Any) -> Client:
        shown: list[Message] = []
        client = Client(
            reactor, "127.0.0.1", self.daemon.access_port,
            f"http://127.0.0.1:{self.daemon.http_port}", name, "pw",
            device="e2e", state=kwargs.pop("state", ClientState(next_cmid=1)),
            on_message=shown.append, http=HTTPClient(Agent(reactor, pool=self.pool)), **kwargs,
        )
        client.shown = shown  # type: ignore[attr-defined]
        self.addCleanup(client.stop)
        return client


class MessageFlowTests(DaemonWithUsers):
    @inlineCallbacks
    def test_six_packets_byte_for_byte(self) -> Any:
        """Two real clients on a fresh database: 你好 travels in exactly the six
        packets of the contract, byte for byte, 48 bytes in all: MSG_A and
        ACK_N carry alice's own seq (1), MSG_N bob's (1)."""
        recorder = Recorder(self)
        alice, bob = self.client("alice"), self.client("bob")
        yield alice.start()
        yield bob.start()
        out = alice.send(self.uids["bob"], "你好")
        yield ensureDeferred(until(lambda: out.state == DELIVERED, what="delivery"))
        [shown] = bob.shown  # type: ignore[attr-defined]
        self.assertEqual(shown.body, "你好")
        ts = shown.ts
        a, b = self.uids["alice"], self.uids["bob"]
        expected = {
            "alice": [("out", encode(P.MsgR(1, b, "你好"))), ("in", encode(P.MsgA(1, 1, 1))),
                      ("in", encode(P.AckN(1)))],
            "bob": [("in", encode(P.MsgN(1, 1, a, "你好", ts))), ("out", encode(P.AckR(1))),
                    ("in", encode(P.AckA(1)))],
        }
        yield ensureDeferred(until(lambda: len(recorder.frames["bob"]) >= 5, what="ACK_A"))
        for name in ("alice", "bob"):
            flow = [f for f in recorder.frames[name]
                    if f[1][1] not in (P.LOGIN, P.WELCOME, P.ONLINE, P.PRESENCE)]
            self.assertEqual(flow, expected[name], name)
        total = sum(len(f[1]) for name in expected for f in expected[name])
        self.assertEqual(total, 48)

    @inlineCallbacks
    def test_offline_receiver_pulls_fifty(self) -> Any:
        """B is offline while A sends 50 messages; B starts, pulls them over HTTP
        and shows each once, in order; A learns all 50 were delivered."""
        alice = self.client("alice")
        yield alice.start()
        sent = [alice.send(self.uids["bob"], f"message {i}") for i in range(50)]
        yield ensureDeferred(until(lambda: all(o.state == STORED for o in sent), what="MSG_As"))
        bob = self.client("bob")
        yield bob.start()
        yield ensureDeferred(until(lambda: all(o.state == DELIVERED for o in sent),
                                   what="ACK_Ns"))
        shown = bob.shown  # type: ignore[attr-defined]
        self.assertEqual([m.body for m in shown], [f"message {i}" for i in range(50)])
        self.assertEqual([m.seq for m in shown], list(range(1, 51)))

    @inlineCallbacks
    def test_retransmitted_msg_r(self) -> Any:
        """A MSG_R sent twice over a real socket gets the same MSG_A twice and
        makes one entry in each timeline; the receiver gets one MSG_N."""
        sender = yield connect(self.daemon.access_port)
        receiver = yield connect(self.daemon.access_port)
        yield sender.login("alice", "pw")
        yield receiver.login("bob", "pw")
        sender.send(P.MsgR(7, self.uids["bob"], "once"))
        first = yield sender.next()
        sender.send(P.MsgR(7, self.uids["bob"], "once"))
        second = yield sender.next()
        self.assertEqual(first, second)
        msg_n = yield receiver.next()
        self.assertEqual((msg_n.seq, msg_n.msg_id), (1, first.msg_id))
        receiver.send(P.AckR(1))
        self.assertEqual((yield receiver.next()), P.AckA(1))
        db = sqlite3.connect(self.daemon.database)
        self.assertEqual(db.execute("SELECT uid, seq FROM inbox ORDER BY uid").fetchall(),
                         [(self.uids["alice"], 1), (self.uids["bob"], 1)])
        db.close()
        for client in (sender, receiver):
            client.transport.loseConnection()
            yield client.lost


class DurabilityTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_sigkill_under_load(self) -> Any:
        """The daemon is killed with SIGKILL while clients exchange messages and
        started again: every message whose MSG_A reached its sender is in the
        sender's and the receiver's timelines exactly once each, and every
        receiver shows every message exactly once, in order."""
        ports = (free_port(), free_port())
        directory = self.mktemp()
        daemon = Daemon(directory, ports=ports)
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        pool = HTTPConnectionPool(reactor, persistent=False)
        pairs = 4
        per_sender = 150
        uids = {}
        for i in range(2 * pairs):
            out, err, code = yield admin(daemon.database, "user", "add", f"u{i}",
                                         "--password", "pw")
            uids[f"u{i}"] = int(out)
        clients: list[Client] = []
        shown: dict[str, list[Message]] = {}
        for i in range(2 * pairs):
            name = f"u{i}"
            shown[name] = []
            client = Client(reactor, "127.0.0.1", ports[0], f"http://127.0.0.1:{ports[1]}",
                            name, "pw", state=ClientState(next_cmid=1),
                            on_message=shown[name].append,
                            http=HTTPClient(Agent(reactor, pool=pool)), resend_after=2.0)
            self.addCleanup(client.stop)
            clients.append(client)
        for client in clients:
            yield client.start()
        sent: dict[str, list[Outgoing]] = {f"u{2 * i}": [] for i in range(pairs)}

        def send_some() -> None:
            for i in range(pairs):
                name = f"u{2 * i}"
                if len(sent[name]) < per_sender:
                    body = f"{name}:{len(sent[name])}"
                    sent[name].append(clients[2 * i].send(uids[f"u{2 * i + 1}"], body))

        pacer = task.LoopingCall(send_some)
        pacer.start(0.01)
        self.addCleanup(lambda: pacer.stop() if pacer.running else None)
        def loaded() -> bool:
            stored = sum(o.msg_id is not None for outs in sent.values() for o in outs)
            return len(sent["u0"]) >= per_sender // 3 and stored >= 20

        yield ensureDeferred(until(loaded, what="load"))
        ended = yield daemon.stop(signal.SIGKILL)
        self.assertEqual(ended.signal, signal.SIGKILL)
        acknowledged = {
            (name, out.msg_id) for name, outs in sent.items() for out in outs
            if out.msg_id is not None
        }
        self.assertTrue(acknowledged)
        restarted = Daemon(directory, ports=ports)
        self.addCleanup(restarted.cleanup)
        yield restarted.start()
        everything = pairs * per_sender

        def done() -> bool:
            return (
                sum(len(outs) for outs in sent.values()) == everything
                and all(o.state == DELIVERED for outs in sent.values() for o in outs)
            )

        def states() -> str:
            counts: dict[str, int] = {}
            for outs in sent.values():
                for o in outs:
                    counts[o.state] = counts.get(o.state, 0) + 1
            return f"every message delivered: {counts}, shown " + str(
                {name: len(s) for name, s in shown.items()})

        try:
            yield ensureDeferred(until(done, timeout=60, what="delivery"))
        except AssertionError:
            raise AssertionError(states()) from None
        db = sqlite3.connect(restarted.database)
        for name, msg_id in acknowledged:
            entries = db.execute("SELECT uid FROM inbox WHERE msg_id = ? ORDER BY uid",
                                 (msg_id,))
            receiver = f"u{int(name[1:]) + 1}"
            self.assertEqual([uid for (uid,) in entries], [uids[name], uids[receiver]],
                             (name, msg_id))
        self.assertEqual(db.execute("SELECT count(*) FROM messages").fetchone()[0], everything)
        db.close()
        for i in range(pairs):
            receiver = f"u{2 * i + 1}"
            bodies = [m.body for m in shown[receiver]]
            self.assertEqual(bodies, [f"u{2 * i}:{k}" for k in range(per_sender)], receiver)
        yield restarted.stop()
        pool.closeCachedConnections()


class TerminalClient(ProcessProtocol):
    """``im58d-client`` in a subprocess, fed lines on its standard input."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def stop(self) -> Deferred[None]:
        """For addCleanup: end the client if the test left it running."""
        if not self.ended.called:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        return self.ended


class TerminalClientTests(DaemonWithUsers):
    @inlineCallbacks
    def test_terminal_client(self) -> Any:
        """A person runs im58d-client: it finds the access server in the IP
        list, signs in, shows a message that arrives and sends one typed as
        "UID text", whose delivery it reports."""
        bob_state = os.path.abspath(self.mktemp())
        terminal = TerminalClient()
        reactor.spawnProcess(
            terminal, sys.executable,
            [sys.executable, "-m", "im58d.client.cli", "--user", "bob", "--password", "pw",
             "--http", f"http://127.0.0.1:{self.daemon.http_port}", "--state", bob_state],
            env=environment(), path=ROOT,
        )
        self.addCleanup(terminal.stop)
        yield ensureDeferred(until(lambda: b"signed in as bob" in terminal.output,
                                   what="sign-in"))
        alice = self.client("alice")
        yield alice.start()
        alice.send(self.uids["bob"], "hello from alice")
        yield ensureDeferred(until(lambda: b"hello from alice" in terminal.output,
                                   what="the message on the terminal"))
        self.assertIn(f"{self.uids['alice']}: hello from alice".encode(), terminal.output)
        terminal.transport.write(f"{self.uids['alice']} hi alice\n".encode())  # type: ignore[union-attr]
        shown = alice.shown  # type: ignore[attr-defined]
        yield ensureDeferred(until(lambda: [m.body for m in shown] == ["hi alice"],
                                   what="bob's answer"))
        yield ensureDeferred(until(lambda: b"delivered" in terminal.output, what="receipt"))
        terminal.transport.write(b"/quit\n")  # type: ignore[union-attr]
        yield terminal.ended


class RestartTests(DaemonWithUsers):
    @inlineCallbacks
    def test_resume_after_a_restart(self) -> Any:
        """The daemon is killed and started again: the sessions live in the
        database, so each client comes back with one RESUME (no second LOGIN,
        no password); the app sees no error, and what it sent while the
        daemon was down is delivered."""
        alice, bob = self.client("alice", min_backoff=0.05, max_backoff=0.2), self.client("bob")
        yield alice.start()
        yield bob.start()
        yield self.daemon.stop(signal.SIGKILL)
        yield ensureDeferred(until(lambda: not alice.connected, what="the drop"))
        out = alice.send(self.uids["bob"], "sent while the daemon was down")
        yield self.daemon.start()
        yield ensureDeferred(until(lambda: out.state == DELIVERED, what="delivery"))
        for client in (alice, bob):
            self.assertTrue(client.connected)
            self.assertEqual((client.logins, client.resumes), (1, 1))
        self.assertEqual([m.body for m in bob.shown],  # type: ignore[attr-defined]
                         ["sent while the daemon was down"])
