"""The reference client SDK (``im58d.client``) against the real server stack.

Each SDK ``Client`` talks to a ``Harness`` (access protocol, SessionManager,
Messenger, SQLite on :memory:) over an in-memory TCP connection made with
``twisted.test.iosim``, and to the server's HTTP site through ``StubTreq``.
Nothing sleeps: bytes move when the pumps are flushed, and time moves only
with ``harness.reactor.advance``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from im58d.client import (
    DELIVERED,
    FAILED,
    SENT,
    STORED,
    Client,
    ClientState,
    FileState,
    LoginFailed,
    Message,
    Outgoing,
)
from im58d.client.client import _Wire
from im58d.wire import Decoder, encode
from im58d.wire import packets as P

from .support import NOW, Harness, add_user

HTTP_URL = "http://im58d.test"


def _remove_frames(transport: iosim.FakeTransport, cls: type) -> list[Any]:
    """Take the frames of packet class ``cls`` out of what ``transport`` has
    buffered and not yet delivered; return them (they are lost in transit)."""
    packets: list[Any] = list(Decoder().feed(b"".join(transport.stream)))
    removed = [p for p in packets if isinstance(p, cls)]
    kept = [p for p in packets if not isinstance(p, cls)]
    transport.stream = [b"".join(encode(p) for p in kept)] if kept else []
    return removed


class Link:
    """One in-memory TCP connection between an SDK client and the server."""

    def __init__(self, server: Any, wire: _Wire, pump: iosim.IOPump) -> None:
        self.server = server
        self.wire = wire
        self.pump = pump

    @property
    def live(self) -> bool:
        return not (self.pump.clientIO.disconnected and self.pump.serverIO.disconnected)

    def lose_to_client(self, cls: type) -> list[Any]:
        """Frames of ``cls`` the server wrote and the client will never read."""
        return _remove_frames(self.pump.serverIO, cls)

    def lose_to_server(self, cls: type) -> list[Any]:
        """Frames of ``cls`` the client wrote and the server will never read."""
        return _remove_frames(self.pump.clientIO, cls)

    def cut(self) -> None:
        """The TCP connection breaks (no BYE): bytes in flight either way are
        lost, then both ends see the connection go."""
        self.pump.serverIO.stream = []
        self.pump.clientIO.stream = []
        self.wire.transport.loseConnection()  # type: ignore[union-attr]
        self.pump.flush()


class RecordingHTTP:
    """The HTTP client the SDK gets: StubTreq, with the requests noted."""

    def __init__(self, treq: Any) -> None:
        self.treq = treq
        self.requests: list[tuple[str, str]] = []

    def get(self, url: str, **kwargs: Any) -> Any:
        self.requests.append(("GET", url[len(HTTP_URL):]))
        return self.treq.get(url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        self.requests.append(("POST", url[len(HTTP_URL):]))
        return self.treq.post(url, **kwargs)


class Device:
    """An SDK client, what it showed and reported, and its connections."""

    def __init__(self, client: Client, http: RecordingHTTP, shown: list[Message],
                 statuses: list[tuple[int, str, int | None]]) -> None:
        self.client = client
        self.http = http
        self.shown = shown  # every Message given to on_message, in order
        self.statuses = statuses  # (cmid, state, msg_id) at every on_status call
        self.links: list[Link] = []

    @property
    def link(self) -> Link:
        return self.links[-1]


class SDKTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.links: list[Link] = []
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")

    # building clients

    def device(
        self, user: str, password: str = "pw", state: ClientState | None = None, **kwargs: Any
    ) -> Device:
        http = RecordingHTTP(self.h.treq)
        shown: list[Message] = []
        statuses: list[tuple[int, str, int | None]] = []

        def on_status(outgoing: Outgoing) -> None:
            statuses.append((outgoing.cmid, outgoing.state, outgoing.msg_id))

        client = Client(
            reactor=self.h.reactor,
            host="im58d.test",
            port=5858,
            http_url=HTTP_URL,
            user=user,
            password=password,
            state=state if state is not None else ClientState(next_cmid=1),
            on_message=shown.append,
            on_status=on_status,
            http=http,
            **kwargs,
        )
        device = Device(client, http, shown, statuses)
        self.patch(client, "_connect", self._connector(client, device))
        return device

    def _connector(self, client: Client, device: Device) -> Callable[[], None]:
        def connect() -> None:
            client._retry = None
            server = self.h.factory.buildProtocol(None)
            wire = _Wire(client)
            pump = iosim.connect(
                server, iosim.makeFakeServer(server), wire, iosim.makeFakeClient(wire), greet=False
            )
            link = Link(server, wire, pump)
            device.links.append(link)
            self.links.append(link)

        return connect

    def start(self, device: Device) -> None:
        d = device.client.start()
        self.settle()
        self.successResultOf(d)

    # moving bytes and time

    def settle(self, rounds: int = 10) -> None:
        """Deliver everything in flight: TCP bytes both ways, store batches and
        write flushes (callLater(0)), HTTP requests and responses."""
        for _ in range(rounds):
            for link in list(self.links):
                if link.live:
                    link.pump.flush()
            self.h.turn()
            self.h.treq.flush()

    def wait(self, seconds: int) -> None:
        """Let ``seconds`` pass one second at a time, settling after each."""
        for _ in range(seconds):
            self.h.reactor.advance(1)
            self.settle()

    def to_server(self, device: Device) -> None:
        """Deliver what ``device`` wrote to the server and let the server
        commit and write its answers, without delivering them."""
        pump = device.link.pump
        data = pump.clientIO.getOutBuffer()
        if data:
            pump.serverIO.bufferReceived(data)
        self.h.turn()

    def server_resend(self, after: int = 10) -> None:
        """Let the server's MSG_N retransmit timeout pass and run its timer."""
        self.h.reactor.advance(after)
        self.h.messenger.resend_late()
        self.settle()

    # looking at the server

    def count(self, sql: str, *args: Any) -> int:
        db = self.h.store._db
        assert db is not None
        return int(db.execute(sql, args).fetchone()[0])

    def msg_id_of(self, sender: int, cmid: int) -> int:
        return self.count("SELECT id FROM messages WHERE sender = ? AND cmid = ?", sender, cmid)

    def acked_seq(self, uid: int) -> int:
        return self.count("SELECT acked_seq FROM inboxes WHERE uid = ?", uid)

    def inbox_size(self, uid: int) -> int:
        return self.count("SELECT count(*) FROM inbox WHERE uid = ?", uid)


class TwoDevices(SDKTestCase):
    """alice and bob, each on an SDK client that has logged in."""

    def setUp(self) -> None:
        super().setUp()
        self.alice = self.device("alice")
        self.bob = self.device("bob")
        self.start(self.alice)
        self.start(self.bob)


class StartTests(SDKTestCase):
    def test_start_fires_after_welcome(self) -> None:
        """start() fires only once WELCOME has come; then the client knows its
        uid and the session's token, and counts as connected."""
        alice = self.device("alice")
        d = alice.client.start()
        self.assertNoResult(d)
        self.assertFalse(alice.client.connected)
        self.settle()
        self.assertIsNone(self.successResultOf(d))
        session = self.h.router.session_for(self.alice_uid)
        self.assertIsNotNone(session)
        self.assertEqual(alice.client.uid, self.alice_uid)
        self.assertEqual(alice.client.token, session.token)
        self.assertTrue(alice.client.connected)
        self.assertEqual(alice.client.logins, 1)
        self.assertEqual(len(alice.links), 1)

    def test_wrong_password(self) -> None:
        """A wrong password makes start() fail with LoginFailed(401), and the
        client does not try again by itself."""
        alice = self.device("alice", password="wrong")
        d = alice.client.start()
        self.settle()
        failure = self.failureResultOf(d, LoginFailed)
        self.assertEqual(failure.value.code, 401)
        self.wait(120)
        self.assertEqual(len(alice.links), 1)
        self.assertFalse(alice.link.live)
        self.assertFalse(alice.client.connected)
        self.assertIsNone(alice.client.uid)
        self.assertIsNone(self.h.router.session_for(self.alice_uid))
        self.assertEqual(self.h.factory.connections, set())

    def test_stop_says_bye(self) -> None:
        """stop() ends the session at once (BYE) and the client stays down."""
        alice = self.device("alice")
        self.start(alice)
        stopped = alice.client.stop()
        self.settle()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIsNone(self.h.router.session_for(self.alice_uid))
        self.wait(60)
        self.assertEqual(len(alice.links), 1)
        self.assertFalse(alice.client.connected)


class SendTests(TwoDevices):
    def test_sent_stored_delivered(self) -> None:
        """send() gives an Outgoing that is "sent" at once, "stored" with its
        msg_id when MSG_A comes and "delivered" when the receiver's SDK has
        acked it; the receiver is shown the message once, with its fields."""
        out = self.alice.client.send(self.bob_uid, "你好")
        self.assertEqual((out.cmid, out.to, out.body, out.state, out.msg_id),
                         (1, self.bob_uid, "你好", SENT, None))
        self.assertEqual(self.alice.statuses, [])
        self.to_server(self.alice)
        msg_id = self.msg_id_of(self.alice_uid, 1)
        self.alice.link.pump.flush()  # MSG_A reaches alice, bob has nothing yet
        self.assertEqual((out.state, out.msg_id, out.ts), (STORED, msg_id, NOW))
        self.assertEqual(self.alice.statuses, [(1, STORED, msg_id)])
        self.assertEqual(self.bob.shown, [])
        self.settle()
        self.assertEqual(self.bob.shown, [Message(1, msg_id, self.alice_uid, "你好", NOW, None)])
        self.assertEqual(self.acked_seq(self.bob_uid), 1)
        self.assertEqual(out.state, DELIVERED)
        self.assertEqual(self.alice.statuses, [(1, STORED, msg_id), (1, DELIVERED, msg_id)])
        self.assertEqual(self.alice.client.waiting, {})
        self.assertEqual(self.alice.client.undelivered, {})
        self.assertEqual(self.alice.client.state.unsent, {})
        self.server_resend(30)
        self.wait(10)
        self.assertEqual(len(self.bob.shown), 1)
        self.assertEqual((out.transmissions, self.alice.client.retransmits), (1, 0))

    def test_binary_body(self) -> None:
        """A bytes body is shown to the receiver as bytes."""
        self.alice.client.send(self.bob_uid, b"\x00\xff")
        self.settle()
        self.assertEqual([m.body for m in self.bob.shown], [b"\x00\xff"])


class AckWaitTests(TwoDevices):
    def test_msg_a_lost_in_a_drop(self) -> None:
        """A MSG_R that reached the server but whose MSG_A was lost when the
        connection broke is sent again after the reconnect; the server answers
        with the same msg_id and keeps one inbox entry; it counts as a
        retransmit; the receiver is shown it once.  The receiver acked it
        meanwhile, so the ACK_N comes with the repeated MSG_A."""
        out = self.alice.client.send(self.bob_uid, "once")
        self.to_server(self.alice)
        msg_id = self.msg_id_of(self.alice_uid, 1)
        self.alice.link.cut()
        self.settle()
        self.assertEqual((out.state, out.msg_id), (SENT, None))
        self.assertFalse(self.alice.client.connected)
        self.assertEqual([m.body for m in self.bob.shown], ["once"])
        self.wait(2)  # the backoff
        self.assertEqual(len(self.alice.links), 2)
        self.assertTrue(self.alice.client.connected)
        self.assertEqual((out.state, out.msg_id), (DELIVERED, msg_id))
        self.assertEqual(self.alice.statuses, [(1, STORED, msg_id), (1, DELIVERED, msg_id)])
        self.assertEqual((out.transmissions, self.alice.client.retransmits), (2, 1))
        self.assertEqual(self.inbox_size(self.bob_uid), 1)
        self.assertEqual(self.count("SELECT count(*) FROM messages"), 1)
        self.assertEqual(self.h.messenger.duplicates, 1)
        self.assertEqual(len(self.bob.shown), 1)
        self.assertEqual(self.alice.client.waiting, {})
        self.assertEqual(self.alice.client.state.unsent, {})

    def test_queued_while_disconnected(self) -> None:
        """A message sent while the connection is down is queued, goes out
        after the next WELCOME (a first transmission, not a retransmit) and is
        delivered."""
        self.alice.link.cut()
        self.settle()
        self.assertFalse(self.alice.client.connected)
        out = self.alice.client.send(self.bob_uid, "later")
        self.settle()
        self.assertEqual((out.state, out.transmissions), (SENT, 0))
        self.assertEqual(self.alice.client.state.unsent, {1: (self.bob_uid, "later", 0)})
        self.assertEqual(self.count("SELECT count(*) FROM messages"), 0)
        self.wait(2)
        self.assertEqual(len(self.alice.links), 2)
        self.assertEqual((out.transmissions, self.alice.client.retransmits), (1, 0))
        self.assertEqual(out.state, DELIVERED)
        self.assertEqual([m.body for m in self.bob.shown], ["later"])

    def test_send_window_after_a_reconnect(self) -> None:
        """100 messages queued while the connection is down do not all go out
        at once on the new connection: 32 MSG_Rs, then one more for each
        MSG_A; all end delivered, each sent once."""
        self.alice.link.cut()
        self.settle()
        outs = [self.alice.client.send(self.bob_uid, f"m{i}") for i in range(100)]
        self.h.reactor.advance(2)  # the backoff: RESUME on a new connection
        self.assertEqual(len(self.alice.links), 2)
        pump = self.alice.link.pump
        self.to_server(self.alice)
        pump.clientIO.bufferReceived(pump.serverIO.getOutBuffer())  # RESUMED
        data = pump.clientIO.getOutBuffer()
        written = [p.cmid for p in Decoder().feed(data) if isinstance(p, P.MsgR)]
        self.assertEqual(written, list(range(1, 33)))
        pump.serverIO.bufferReceived(data)
        self.settle()
        self.assertEqual([o.state for o in outs], [DELIVERED] * 100)
        self.assertEqual([o.transmissions for o in outs], [1] * 100)
        self.assertEqual([m.body for m in self.bob.shown], [f"m{i}" for i in range(100)])

    def test_sent_before_start(self) -> None:
        """A message sent before start() waits for the first WELCOME."""
        carol_uid = add_user(self.h.store, "carol")
        carol = self.device("carol")
        out = carol.client.send(self.bob_uid, "early")
        self.assertEqual(out.transmissions, 0)
        self.start(carol)
        self.assertEqual((out.state, out.transmissions), (DELIVERED, 1))
        self.assertEqual(self.bob.shown[0].sender, carol_uid)

    def test_resend_on_a_live_connection(self) -> None:
        """Without MSG_A for resend_after (5) seconds the MSG_R is sent again
        on the same connection, and the answer gives the same msg_id."""
        carol_uid = add_user(self.h.store, "carol")  # offline: no ACK_N to mix in
        out = self.alice.client.send(carol_uid, "slow")
        self.to_server(self.alice)
        msg_id = self.msg_id_of(self.alice_uid, 1)
        [lost] = self.alice.link.lose_to_client(P.MsgA)
        self.assertEqual(lost, P.MsgA(1, msg_id, NOW))
        self.settle()
        self.assertEqual((out.state, out.transmissions), (SENT, 1))
        self.wait(4)
        self.assertEqual((out.state, out.transmissions), (SENT, 1))
        self.wait(1)
        self.assertEqual((out.state, out.msg_id, out.ts), (STORED, msg_id, NOW))
        self.assertEqual(self.alice.statuses, [(1, STORED, msg_id)])
        self.assertEqual((out.transmissions, self.alice.client.retransmits), (2, 1))
        self.assertEqual(len(self.alice.links), 1)
        self.assertEqual(self.inbox_size(carol_uid), 1)
        self.assertEqual(self.h.messenger.duplicates, 1)
        self.wait(10)
        self.assertEqual(out.transmissions, 2)

    def test_ack_n_before_msg_a(self) -> None:
        """When the MSG_A is lost but the receiver's ACK_N arrives, the message
        is delivered (with its msg_id) and leaves the ack-wait queue."""
        out = self.alice.client.send(self.bob_uid, "quick")
        self.to_server(self.alice)
        msg_id = self.msg_id_of(self.alice_uid, 1)
        self.alice.link.lose_to_client(P.MsgA)
        self.settle()
        self.assertEqual((out.state, out.msg_id), (DELIVERED, msg_id))
        self.assertEqual(self.alice.client.waiting, {})
        self.assertEqual(self.alice.client.state.unsent, {})
        self.wait(10)
        self.assertEqual(out.transmissions, 1)

    def test_no_resend_once_stored(self) -> None:
        """A message whose MSG_A came is not sent again, on this connection or
        after a reconnect."""
        out = self.alice.client.send(self.bob_uid, "fine")
        self.settle()
        self.wait(12)
        self.alice.link.cut()
        self.wait(2)
        self.assertEqual(len(self.alice.links), 2)
        self.assertEqual((out.transmissions, self.alice.client.retransmits), (1, 0))
        self.assertEqual(self.h.messenger.received, 1)


class ReceiverDedupTests(TwoDevices):
    def test_server_retransmit_shown_once(self) -> None:
        """When the receiver's ACK_R is lost, the server sends the MSG_N again;
        the SDK does not show it again but acks it again, and that ack gets
        through (the sender sees "delivered")."""
        out = self.alice.client.send(self.bob_uid, "again")
        self.to_server(self.alice)
        self.bob.link.pump.flush()  # MSG_N reaches bob
        self.h.turn()  # bob writes ACK_R
        [lost] = self.bob.link.lose_to_server(P.AckR)
        self.assertEqual(lost, P.AckR(1))
        self.settle()
        self.assertEqual(len(self.bob.shown), 1)
        self.assertEqual(self.acked_seq(self.bob_uid), 0)
        self.assertEqual(out.state, STORED)
        self.server_resend()
        self.assertEqual(self.h.messenger.retransmitted, 1)
        self.assertEqual([m.body for m in self.bob.shown], ["again"])
        self.assertEqual(self.bob.client.duplicates, 1)
        self.assertEqual(self.acked_seq(self.bob_uid), 1)
        self.assertEqual(out.state, DELIVERED)

    def test_injected_duplicate_acked_again(self) -> None:
        """A MSG_N the client has shown already, coming again, is acked again
        (ACK_R with the same seq) and not shown."""
        self.alice.client.send(self.bob_uid, "hi")
        self.settle()
        [message] = self.bob.shown
        acks = self.h.messenger.acks
        self.bob.link.wire.dataReceived(encode(P.MsgN(*message)))
        self.h.turn()
        self.assertEqual(self.bob.link.lose_to_server(P.AckR), [P.AckR(1)])
        self.bob.link.wire.dataReceived(encode(P.MsgN(*message)))
        self.settle()
        self.assertEqual(self.bob.shown, [message])
        self.assertEqual(self.bob.client.duplicates, 2)
        self.assertEqual(self.h.messenger.acks, acks + 1)


class LostAckTests(SDKTestCase):
    def test_ack_lost_in_a_drop_is_sent_again(self) -> None:
        """An ACK_R lost when the receiver's connection broke is sent again
        after the reconnect, so the sender learns the message was delivered."""
        alice = self.device("alice")
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        out = alice.client.send(self.bob_uid, "did you get it?")
        self.to_server(alice)
        bob.link.pump.flush()  # the MSG_N reaches bob
        self.h.reactor.advance(0)  # bob shows it and writes ACK_R
        self.assertEqual(len(bob.link.lose_to_server(P.AckR)), 1)
        bob.link.cut()
        self.assertEqual([m.body for m in bob.shown], ["did you get it?"])
        self.assertEqual(self.acked_seq(self.bob_uid), 0)
        self.wait(2)
        self.assertTrue(bob.client.connected)
        self.assertEqual(self.acked_seq(self.bob_uid), 1)
        self.assertEqual(out.state, DELIVERED)
        self.assertEqual(len(bob.shown), 1)


class OfflineTests(SDKTestCase):
    def test_offline_pull_of_50(self) -> None:
        """Fifty messages sent while the receiver is offline are shown to it,
        once each and in seq order, pulled over HTTP after its WELCOME; the
        sender sees all fifty delivered."""
        alice = self.device("alice")
        self.start(alice)
        outs = [alice.client.send(self.bob_uid, f"message {i}") for i in range(1, 51)]
        self.settle()
        self.assertEqual({o.state for o in outs}, {STORED})
        bob = self.device("bob")
        self.start(bob)
        self.assertEqual(bob.http.requests, [("GET", "/v1/inbox?after=0&limit=500")])
        self.assertEqual([m.seq for m in bob.shown], list(range(1, 51)))
        self.assertEqual([m.body for m in bob.shown], [f"message {i}" for i in range(1, 51)])
        self.assertEqual(bob.shown[0], Message(1, self.msg_id_of(self.alice_uid, 1),
                                               self.alice_uid, "message 1", NOW, None))
        self.assertEqual(bob.client.state.last_seq, 50)
        self.assertEqual(self.acked_seq(self.bob_uid), 50)
        self.assertEqual({o.state for o in outs}, {DELIVERED})
        self.assertEqual([s for s in alice.statuses if s[1] == DELIVERED],
                         [(o.cmid, DELIVERED, o.msg_id) for o in outs])
        self.server_resend(30)
        self.wait(10)
        self.assertEqual(len(bob.shown), 50)
        self.assertEqual(len(bob.http.requests), 1)

    def test_binary_body_pulled(self) -> None:
        """A bytes body pulled over HTTP (sent as base64url) is shown as bytes."""
        alice = self.device("alice")
        self.start(alice)
        alice.client.send(self.bob_uid, b"\xfb\xff")
        self.settle()
        bob = self.device("bob")
        self.start(bob)
        self.assertEqual([m.body for m in bob.shown], [b"\xfb\xff"])

    def test_nothing_to_pull(self) -> None:
        """With an empty inbox the client makes no HTTP request after WELCOME."""
        bob = self.device("bob")
        self.start(bob)
        self.assertEqual(bob.http.requests, [])

    def test_gap_pulls_the_inbox(self) -> None:
        """A MSG_N whose seq skips one (the one before was lost) makes the
        client pull the inbox over HTTP; it shows the messages in seq order,
        each once, and acks up to the last."""
        alice = self.device("alice")
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        alice.client.send(self.bob_uid, "one")
        self.settle()
        alice.client.send(self.bob_uid, "two")
        self.to_server(alice)
        [lost] = bob.link.lose_to_client(P.MsgN)
        self.assertEqual(lost.seq, 2)
        self.settle()
        self.assertEqual([m.seq for m in bob.shown], [1])
        self.assertEqual(bob.http.requests, [])
        alice.client.send(self.bob_uid, "three")
        self.settle()
        self.assertEqual(bob.http.requests, [("GET", "/v1/inbox?after=1&limit=500")])
        self.assertEqual([(m.seq, m.body) for m in bob.shown],
                         [(1, "one"), (2, "two"), (3, "three")])
        self.assertEqual(self.acked_seq(self.bob_uid), 3)
        self.assertEqual(bob.client.state.last_seq, 3)

    def test_injected_gap(self) -> None:
        """A MSG_N whose seq skips the next one is held back, the inbox is
        pulled over HTTP, and the messages are shown in seq order."""
        alice = self.device("alice")
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        alice.client.send(self.bob_uid, "one")
        alice.client.send(self.bob_uid, "two")
        self.to_server(alice)
        msg_ns = bob.link.lose_to_client(P.MsgN)
        self.assertEqual([m.seq for m in msg_ns], [1, 2])
        self.settle()
        self.assertEqual(bob.shown, [])
        bob.link.wire.dataReceived(encode(msg_ns[1]))
        self.assertEqual(bob.shown, [])
        self.settle()
        self.assertEqual(bob.http.requests, [("GET", "/v1/inbox?after=0&limit=500")])
        self.assertEqual([(m.seq, m.msg_id, m.body) for m in bob.shown],
                         [(1, msg_ns[0].msg_id, "one"), (2, msg_ns[1].msg_id, "two")])
        self.assertEqual(self.acked_seq(self.bob_uid), 2)


class StatusTests(SDKTestCase):
    def test_refresh_status(self) -> None:
        """refresh_status() reports messages not yet acked as still "stored";
        after a reconnect the client asks by itself and marks delivered the
        messages whose ACK_N it missed (it was away when the receiver acked)."""
        alice = self.device("alice")
        self.start(alice)
        out = alice.client.send(self.bob_uid, "while you were out")
        self.settle()
        self.assertEqual(out.state, STORED)
        d = alice.client.refresh_status()
        self.settle()
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(alice.http.requests, [("POST", "/v1/status")])
        alice.link.cut()
        bob = self.device("bob")
        self.start(bob)  # pulls and acks while alice is away
        self.assertEqual(len(bob.shown), 1)
        self.assertEqual(self.acked_seq(self.bob_uid), 1)
        self.wait(2)  # alice is back, missed the ACK_N and asks
        self.assertTrue(alice.client.connected)
        self.assertEqual(alice.http.requests, [("POST", "/v1/status")] * 2)
        self.assertEqual(out.state, DELIVERED)
        self.assertEqual(alice.statuses[-1], (out.cmid, DELIVERED, out.msg_id))
        self.assertEqual(alice.client.undelivered, {})
        d = alice.client.refresh_status()
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(len(alice.http.requests), 2)  # nothing left to ask


class RefusalTests(SDKTestCase):
    def test_body_over_the_limit_fails_at_once(self) -> None:
        """A body the server would refuse fails at once, takes no cmid and is
        never sent."""
        alice = self.device("alice")
        self.start(alice)
        out = alice.client.send(self.bob_uid, "x" * 4097)
        self.assertEqual((out.state, out.cmid), (FAILED, 0))
        self.assertEqual(out.error, (413, "body over 4096 bytes"))
        self.assertEqual(alice.client.waiting, {})
        fits = alice.client.send(self.bob_uid, "é" * 2048)
        self.settle()
        self.assertEqual((fits.cmid, fits.state), (1, STORED))

    def test_locked_out_client_keeps_trying(self) -> None:
        """When reconnecting meets 429 (someone guessed the password wrong too
        often), the client waits and tries again rather than stopping."""
        alice = self.device("alice")
        self.start(alice)
        for _ in range(5):
            self.h.throttle.attempt("alice", "10.6.6.6")
            self.h.throttle.finished("alice", "10.6.6.6", False)
        alice.link.cut()
        # the session cannot be resumed (say the server restarted): LOGIN it is
        self.h.sessions.end(self.h.router.session_for(self.alice_uid))
        self.wait(3)
        self.assertFalse(alice.client.connected)
        self.h.reactor.advance(900)  # the failures age out
        self.wait(60)
        self.assertTrue(alice.client.connected)

    def test_unknown_receiver(self) -> None:
        """A message to a uid that does not exist ends FAILED with the server's
        404, leaves the ack-wait queue and is never sent again; the connection
        stays up."""
        alice = self.device("alice")
        self.start(alice)
        out = alice.client.send(999, "hello?")
        self.settle()
        self.assertEqual(out.state, FAILED)
        self.assertEqual(out.error, (404, "no such user 999"))
        self.assertIsNone(out.msg_id)
        self.assertEqual(alice.statuses, [(out.cmid, FAILED, None)])
        self.assertEqual(alice.client.waiting, {})
        self.assertEqual(alice.client.state.unsent, {})
        self.wait(12)
        alice.link.cut()
        self.wait(2)
        self.assertEqual(len(alice.links), 2)
        self.assertEqual(out.transmissions, 1)
        self.assertEqual(self.h.messenger.received, 1)
        self.assertEqual(out.state, FAILED)
        self.assertEqual(len(alice.statuses), 1)

    def test_error_keeps_connection(self) -> None:
        """After a refused message the client still sends on the same connection."""
        alice = self.device("alice")
        self.start(alice)
        alice.client.send(999, "no")
        out = alice.client.send(self.bob_uid, "yes")
        self.settle()
        self.assertEqual(out.state, STORED)
        self.assertEqual(len(alice.links), 1)
        self.assertTrue(alice.client.connected)


class KickedTests(SDKTestCase):
    def test_replaced_by_a_second_login(self) -> None:
        """A second login of the same user elsewhere (KICKED 1) stops the first
        client for good: it does not reconnect, while the second one stays."""
        first = self.device("alice", device="phone")
        second = self.device("alice", device="tablet")
        self.start(first)
        self.start(second)
        self.wait(120)
        self.assertEqual(len(first.links), 1)
        self.assertFalse(first.link.live)
        self.assertFalse(first.client.connected)
        self.assertEqual(first.client.logins, 1)
        self.assertEqual(len(second.links), 1)
        self.assertTrue(second.client.connected)
        session = self.h.router.session_for(self.alice_uid)
        self.assertEqual(session.token, second.client.token)
        self.assertEqual(session.device, "tablet")


class FileStateTests(SDKTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.path = self.mktemp()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def test_new_state_file_never_reuses_cmids(self) -> None:
        """A fresh state file (a new phone) does not reuse the cmids of an
        earlier one: its first message is a new message, not a duplicate."""
        alice = self.device("alice", state=FileState(self.path))
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        first = alice.client.send(self.bob_uid, "from the old phone")
        self.settle()
        stopped = alice.client.stop()
        self.settle()
        self.successResultOf(stopped)
        self.h.reactor.advance(1)  # the clock moves on between the two phones
        other = self.path + ".new"
        phone = self.device("alice", state=FileState(other))
        self.start(phone)
        second = phone.client.send(self.bob_uid, "from the new phone")
        self.settle()
        self.assertNotEqual(second.cmid, first.cmid)
        self.assertNotEqual(second.msg_id, first.msg_id)
        self.assertEqual([m.body for m in bob.shown], ["from the old phone", "from the new phone"])

    def test_restart_keeps_cmids_and_seqs(self) -> None:
        """A new Client with a FileState on the same file continues the cmid
        counter and shows only what it has not shown before."""
        alice = self.device("alice")
        self.start(alice)
        bob = self.device("bob", state=FileState(self.path))
        self.start(bob)
        alice.client.send(self.bob_uid, "one")
        alice.client.send(self.bob_uid, "two")
        first = bob.client.send(self.alice_uid, "bob's first")
        self.settle()
        self.assertGreater(first.cmid, 1_700_000_000_000)  # a fresh file starts at the clock
        self.assertEqual([m.body for m in bob.shown], ["one", "two"])
        stopped = bob.client.stop()
        self.settle()
        self.successResultOf(stopped)
        alice.client.send(self.bob_uid, "three")
        self.settle()
        with open(self.path, encoding="utf-8") as f:
            saved = json.load(f)
        self.assertEqual((saved["next_cmid"], saved["last_seq"], saved["unsent"]),
                         (first.cmid + 1, 2, {}))

        again = self.device("bob", state=FileState(self.path))
        self.start(again)
        self.assertEqual(again.http.requests, [("GET", "/v1/inbox?after=2&limit=500")])
        self.assertEqual([(m.seq, m.body) for m in again.shown], [(3, "three")])
        second = again.client.send(self.alice_uid, "bob's second")
        self.settle()
        self.assertEqual(second.cmid, first.cmid + 1)
        self.assertEqual(second.state, DELIVERED)
        self.assertNotEqual(second.msg_id, first.msg_id)
        self.assertEqual(self.inbox_size(self.alice_uid), 2)

    def test_unsent_messages_sent_after_restart(self) -> None:
        """Messages without MSG_A when the app died are in the file and are sent
        by the next run: one whose MSG_A was lost gets its first msg_id (no
        second copy), one queued offline (a bytes body) is stored now."""
        bob = self.device("bob")
        self.start(bob)
        alice = self.device("alice", state=FileState(self.path))
        self.start(alice)
        lost = alice.client.send(self.bob_uid, "reached the server")
        c1 = lost.cmid
        self.to_server(alice)
        msg_id = self.msg_id_of(self.alice_uid, c1)
        alice.link.cut()
        queued = alice.client.send(self.bob_uid, b"\x00queued\xff")
        c2 = queued.cmid
        self.successResultOf(alice.client.stop())  # the app dies
        self.assertEqual(lost.state, SENT)

        state = FileState(self.path)
        self.assertEqual(state.next_cmid, c2 + 1)
        self.assertEqual(state.unsent, {c1: (self.bob_uid, "reached the server", 0),
                                        c2: (self.bob_uid, b"\x00queued\xff", 0)})
        again = self.device("alice", state=state)
        self.assertEqual(sorted(again.client.waiting), [c1, c2])
        self.start(again)  # resumes the session the dead app left lingering
        self.assertEqual(again.client.resumes, 1)
        final = {cmid: (state, msg) for cmid, state, msg in again.statuses}
        self.assertEqual(final[c1][1], msg_id)  # bob's ACK_N may beat the MSG_A
        self.assertIn((c2, STORED, self.msg_id_of(self.alice_uid, c2)), again.statuses)
        self.assertEqual([m.body for m in bob.shown], ["reached the server", b"\x00queued\xff"])
        self.assertEqual(self.inbox_size(self.bob_uid), 2)
        self.assertEqual(again.client.waiting, {})
        self.assertEqual(FileState(self.path).unsent, {})
        self.assertEqual(FileState(self.path).next_cmid, c2 + 1)


class _Page:
    """An HTTP response of /v1/inbox as the SDK reads it."""

    def __init__(self, messages: list[tuple[int, str]], inbox_max: int) -> None:
        self.code = 200
        self._body = {
            "messages": [
                {"seq": seq, "msg_id": seq, "from": 1, "body": body, "ts": 0}
                for seq, body in messages
            ],
            "max": inbox_max,
        }

    def json(self) -> Any:
        return succeed(self._body)


class HeldHTTP:
    """An HTTP client whose answers the test gives when it chooses."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Deferred[Any]]] = []

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.asked.append((url.rpartition("/")[2], d))
        return d


class PullRaceTests(SynchronousTestCase):
    def test_push_past_the_gap_during_a_pull(self) -> None:
        """A MSG_N that arrives while a pull is under way, past a seq the
        pull's page does not cover (a message stored after the page was read,
        its push lost), is not left waiting for the next push: the pull goes
        on until nothing is held ahead, and all are shown in order."""
        http = HeldHTTP()
        client = Client(Clock(), None, None, HTTP_URL, "bob", "pw",
                        state=ClientState(next_cmid=1), http=http)
        shown: list[int] = []
        client.on_message = lambda message: shown.append(message.seq)
        client.token = "t"
        client._on_msg_n(P.MsgN(2, 2, 1, "two", 0))  # 1 is missing: a pull
        [(query, first)] = http.asked
        self.assertEqual(query, "inbox?after=0&limit=500")
        client._on_msg_n(P.MsgN(4, 4, 1, "four", 0))  # 3 stored after the page was read
        first.callback(_Page([(1, "one"), (2, "two")], 2))
        self.assertEqual(shown, [1, 2])
        [_, (query, second)] = http.asked
        self.assertEqual(query, "inbox?after=2&limit=500")
        second.callback(_Page([(3, "three"), (4, "four")], 4))
        self.assertEqual(shown, [1, 2, 3, 4])
        self.assertEqual(len(http.asked), 2)
