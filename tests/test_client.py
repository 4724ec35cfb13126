"""The reference client SDK (``im58d.client``) against the real server stack,
contract version 2.

Each SDK ``Client`` talks to a ``Harness`` (access protocol, SessionManager,
Messenger, SQLite on :memory:) over an in-memory TCP connection made with
``twisted.test.iosim``, and to the server's HTTP site through ``StubTreq``.
Nothing sleeps: bytes move when the pumps are flushed, and time moves only
with ``harness.reactor.advance``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from im58d.client import (
    DELIVERED,
    DISABLED,
    EXPIRED,
    FAILED,
    NO_CREDENTIALS,
    REPLACED,
    SENT,
    SIGNED_OUT,
    STORED,
    THROTTLED,
    UNAUTHORIZED,
    Client,
    ClientState,
    FileState,
    LoginFailed,
    Message,
    Outgoing,
)
from im58d.client.cli import Terminal, show_message, watch, watch_session
from im58d.client.client import CLIENT, OWN_ACK_DELAY, SIGN_IN_TIMEOUT, _Wire
from im58d.store.accounts import make_friends_txn
from im58d.wire import Decoder, encode
from im58d.wire import packets as P

from .support import DEVICE, NOW, Harness, add_user

HTTP_URL = "http://im58d.test"
# support.DEVICE as POST /v1/login takes a device id (base64url, no padding)
DEVICE_ID = base64.urlsafe_b64encode(DEVICE).rstrip(b"=").decode()


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

    def written(self) -> list[Any]:
        """The packets the client wrote and the server has not read yet."""
        return list(Decoder().feed(b"".join(self.pump.clientIO.stream)))

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

    def delete(self, url: str, **kwargs: Any) -> Any:
        self.requests.append(("DELETE", url[len(HTTP_URL):]))
        return self.treq.delete(url, **kwargs)


class Device:
    """An SDK client, what it showed and reported, and its connections."""

    def __init__(self, client: Client, http: RecordingHTTP, shown: list[Message],
                 statuses: list[tuple[int, str, int | None]]) -> None:
        self.client = client
        self.http = http
        self.shown = shown  # every Message given to on_message, in order
        self.statuses = statuses  # (cmid, state, msg_id) at every on_status call
        self.links: list[Link] = []
        self.lost: list[str] = []  # on_session_lost's reasons
        self.online: list[tuple[int, ...]] = []  # on_online's uids
        # ("unreachable" | "tls" , detail) and ("reachable", "")
        self.notices: list[tuple[str, str]] = []
        self.refuse = False  # connection attempts fail (the server is unreachable)

    @property
    def link(self) -> Link:
        return self.links[-1]

    def copies(self) -> list[Message]:
        """What it showed of the user's own messages (sent from other devices)."""
        return [m for m in self.shown if m.sender == self.client.uid]


class SDKTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.links: list[Link] = []
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")

    # building clients

    def device(
        self, user: str, password: str | None = "pw", state: ClientState | None = None,
        **kwargs: Any
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
        if "on_session_lost" not in kwargs:
            client.on_session_lost = device.lost.append
        if "on_online" not in kwargs:
            client.on_online = device.online.append
        client.on_unreachable = lambda detail: device.notices.append(("unreachable", detail))
        client.on_tls_refused = lambda detail: device.notices.append(("tls", detail))
        client.on_reachable = lambda: device.notices.append(("reachable", ""))
        self.patch(client, "_connect", self._connector(client, device))
        return device

    def _connector(self, client: Client, device: Device) -> Callable[[], None]:
        def connect() -> None:
            client._retry = None
            if device.refuse:
                client._connect_failed(_failure(ConnectionRefusedError("refused")))
                return
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
        """The highest ack cursor of the user's devices."""
        return self.count("SELECT acked_seq FROM inboxes WHERE uid = ?", uid)

    def cursor(self, device: Device) -> int:
        """The ack cursor of the device (by its device id) in the store."""
        return self.count("SELECT acked FROM device_cursors WHERE device_id = ?",
                          device.client.state.device_id)

    def inbox_size(self, uid: int) -> int:
        return self.count("SELECT count(*) FROM inbox WHERE uid = ?", uid)

    def server_device(self, device: Device) -> Any:
        """The server's copy of the device's session, while it is online."""
        session = device.client.state.session
        assert session is not None
        return self.h.router.device_by_id(session["session_id"])

    def befriend(self, a: int, b: int) -> None:
        db = self.h.store._db
        assert db is not None
        make_friends_txn(db, a, b, 0)


def _failure(error: Exception) -> Failure:
    return Failure(error)


def _stored(outgoing: Outgoing) -> tuple[int, int]:
    """(seq, msg_id) of a message the server has stored."""
    assert outgoing.seq is not None and outgoing.msg_id is not None, outgoing
    return outgoing.seq, outgoing.msg_id


def _session(device: Device) -> dict[str, Any]:
    session = device.client.state.session
    assert session is not None
    return session


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
        uid and the session's token, counts as connected, and has forgotten
        the password.  LOGIN named the state's device id, the device's name
        and the client."""
        alice = self.device("alice")
        d = alice.client.start()
        self.assertNoResult(d)
        self.assertFalse(alice.client.connected)
        [login] = alice.link.written()
        self.assertEqual(login, P.Login("alice", "pw", alice.client.state.device_id,
                                        "im58d-client", CLIENT))
        self.assertEqual(len(alice.client.state.device_id), 16)
        self.settle()
        self.assertIsNone(self.successResultOf(d))
        session = self.server_device(alice)
        self.assertIsNotNone(session)
        self.assertEqual(session.device_id, alice.client.state.device_id)
        self.assertEqual(alice.client.uid, self.alice_uid)
        self.assertEqual(alice.client.token, session.token)
        self.assertTrue(alice.client.connected)
        self.assertEqual(alice.client.logins, 1)
        self.assertEqual(len(alice.links), 1)
        self.assertIsNone(alice.client.password)
        self.assertEqual(_session(alice)["session_key"], session.key)
        self.assertEqual(alice.client.state.last_seq, 0)
        self.assertEqual(alice.lost, [])

    def test_online_after_welcome(self) -> None:
        """ONLINE after WELCOME reaches on_online with the friends online now
        (an empty tuple when none is)."""
        self.befriend(self.alice_uid, self.bob_uid)
        bob = self.device("bob")
        self.start(bob)
        self.assertEqual(bob.online, [()])
        alice = self.device("alice")
        self.start(alice)
        self.assertEqual(alice.online, [(self.bob_uid,)])

    def test_wrong_password(self) -> None:
        """A wrong password makes start() fail with LoginFailed(401), tells
        the app (on_session_lost "unauthorized"), and the client does not try
        again by itself."""
        alice = self.device("alice", password="wrong")
        d = alice.client.start()
        self.settle()
        failure = self.failureResultOf(d, LoginFailed)
        self.assertEqual((failure.value.code, failure.value.reason), (401, UNAUTHORIZED))
        self.assertEqual(alice.lost, [UNAUTHORIZED])
        self.wait(120)
        self.assertEqual(len(alice.links), 1)
        self.assertFalse(alice.link.live)
        self.assertFalse(alice.client.connected)
        self.assertIsNone(alice.client.uid)
        self.assertIsNone(self.h.router.user(self.alice_uid))
        self.assertEqual(self.h.factory.connections, set())
        self.assertEqual(alice.lost, [UNAUTHORIZED])

    def test_throttled_at_start(self) -> None:
        """429 at the first LOGIN (too many failed attempts) fails start()
        with reason "throttled"; the app decides when to try again."""
        for _ in range(5):
            self.h.throttle.attempt("alice", "10.6.6.6")
            self.h.throttle.finished("alice", "10.6.6.6", False)
        alice = self.device("alice")
        d = alice.client.start()
        self.settle()
        failure = self.failureResultOf(d, LoginFailed)
        self.assertEqual((failure.value.code, failure.value.reason), (429, THROTTLED))
        self.assertEqual(alice.lost, [THROTTLED])
        self.wait(60)
        self.assertEqual(len(alice.links), 1)

    def test_no_credentials(self) -> None:
        """Without a session to resume and without a password, start() fails
        at once ("no credentials"), and nothing is sent."""
        alice = self.device("alice", password=None)
        d = alice.client.start()
        failure = self.failureResultOf(d, LoginFailed)
        self.assertEqual(failure.value.reason, NO_CREDENTIALS)
        self.assertEqual(alice.lost, [NO_CREDENTIALS])
        self.assertEqual(alice.links, [])

    def test_stop_says_bye_and_the_session_stays(self) -> None:
        """stop() takes the device offline at once (BYE) and the client stays
        down; the session stays: a new Client on the same state, without a
        password, RESUMEs it."""
        alice = self.device("alice")
        self.start(alice)
        stopped = alice.client.stop()
        self.settle()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIsNone(self.h.router.user(self.alice_uid))
        self.wait(60)
        self.assertEqual(len(alice.links), 1)
        self.assertFalse(alice.client.connected)
        again = self.device("alice", password=None, state=alice.client.state)
        self.start(again)
        self.assertEqual((again.client.logins, again.client.resumes), (0, 1))
        self.assertEqual(again.client.uid, self.alice_uid)
        self.assertEqual(again.client.token, alice.client.token)


class SendTests(TwoDevices):
    def test_sent_stored_delivered(self) -> None:
        """send() gives an Outgoing that is "sent" at once, "stored" with its
        msg_id and its seq in the sender's timeline when MSG_A comes and
        "delivered" when the receiver's SDK has acked it (ACK_N names that
        seq); the receiver is shown the message once, with its fields; the
        sender counts its own seq as received and acks it lazily: with its
        next ACK_R, or alone OWN_ACK_DELAY seconds later (the six packets of a
        message stay six)."""
        out = self.alice.client.send(self.bob_uid, "你好")
        self.assertEqual((out.cmid, out.to, out.body, out.state, out.msg_id),
                         (1, self.bob_uid, "你好", SENT, None))
        self.assertEqual(self.alice.statuses, [])
        self.to_server(self.alice)
        msg_id = self.msg_id_of(self.alice_uid, 1)
        self.alice.link.pump.flush()  # MSG_A reaches alice, bob has nothing yet
        self.assertEqual((out.state, out.msg_id, out.seq), (STORED, msg_id, 1))
        self.assertEqual(self.alice.statuses, [(1, STORED, msg_id)])
        self.assertEqual(self.bob.shown, [])
        self.settle()
        self.assertEqual(self.bob.shown, [Message(1, msg_id, self.alice_uid, "你好", NOW, None)])
        self.assertEqual(self.cursor(self.bob), 1)
        self.assertEqual(out.state, DELIVERED)
        self.assertEqual(self.alice.statuses, [(1, STORED, msg_id), (1, DELIVERED, msg_id)])
        self.assertEqual(self.alice.client.waiting, {})
        self.assertEqual(self.alice.client.undelivered, {})
        self.assertEqual(self.alice.client.state.unsent, {})
        self.assertEqual(self.alice.client.state.last_seq, 1)
        self.assertEqual(self.cursor(self.alice), 0)
        self.wait(int(OWN_ACK_DELAY) - 1)
        self.assertEqual(self.cursor(self.alice), 0)
        self.wait(1)
        self.assertEqual(self.cursor(self.alice), 1)
        self.assertEqual(self.alice.shown, [])
        self.server_resend(30)
        self.wait(10)
        self.assertEqual(len(self.bob.shown), 1)
        self.assertEqual((out.transmissions, self.alice.client.retransmits), (1, 0))
        self.assertEqual(self.alice.client.state.mine, set())

    def test_binary_body(self) -> None:
        """A bytes body is shown to the receiver as bytes."""
        self.alice.client.send(self.bob_uid, b"\x00\xff")
        self.settle()
        self.assertEqual([m.body for m in self.bob.shown], [b"\x00\xff"])

    def test_bye_acks_own_messages(self) -> None:
        """An app that closes right after sending: BYE goes with the ACK_R
        that covers the device's own messages, so its cursor is at the head
        and the next sign-in pulls nothing it sent itself."""
        self.alice.client.send(self.bob_uid, "and goodbye")
        self.settle()
        self.assertEqual(self.cursor(self.alice), 0)
        stopped = self.alice.client.stop()
        self.settle()
        self.successResultOf(stopped)
        self.assertEqual(self.cursor(self.alice), 1)

    def test_own_seqs_and_received_ones_interleave(self) -> None:
        """The sender's timeline holds its own messages and those it received
        in one seq order: its own are never shown to it, the received ones
        are shown once, and its cursor covers both (the own ones at the
        latest OWN_ACK_DELAY later), with no HTTP pull."""
        self.alice.client.send(self.bob_uid, "a1")
        self.settle()
        self.bob.client.send(self.alice_uid, "b1")
        self.settle()
        self.alice.client.send(self.bob_uid, "a2")
        self.settle()
        self.assertEqual([(m.seq, m.body) for m in self.alice.shown], [(2, "b1")])
        self.assertEqual([(m.seq, m.body) for m in self.bob.shown], [(1, "a1"), (3, "a2")])
        self.assertEqual((self.alice.client.state.last_seq, self.cursor(self.alice)), (3, 2))
        self.wait(int(OWN_ACK_DELAY))
        self.assertEqual((self.alice.client.state.last_seq, self.cursor(self.alice)), (3, 3))
        self.assertEqual((self.bob.client.state.last_seq, self.cursor(self.bob)), (3, 3))
        self.assertEqual(self.alice.http.requests, [])
        self.assertEqual(self.bob.http.requests, [])


class AckWaitTests(TwoDevices):
    def test_msg_a_lost_in_a_drop(self) -> None:
        """A MSG_R that reached the server but whose MSG_A was lost when the
        connection broke is sent again after the reconnect; the server answers
        with the same msg_id and seq and keeps one inbox entry; it counts as a
        retransmit; the receiver is shown it once.  The receiver acked it
        meanwhile, so the ACK_N comes with the repeated MSG_A.  The sender
        pulled its own entry meanwhile and does not show it."""
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
        self.assertEqual((out.state, out.msg_id, out.seq), (DELIVERED, msg_id, 1))
        self.assertEqual(self.alice.statuses, [(1, STORED, msg_id), (1, DELIVERED, msg_id)])
        self.assertEqual((out.transmissions, self.alice.client.retransmits), (2, 1))
        self.assertEqual(self.inbox_size(self.bob_uid), 1)
        self.assertEqual(self.count("SELECT count(*) FROM messages"), 1)
        self.assertEqual(self.h.messenger.duplicates, 1)
        self.assertEqual(len(self.bob.shown), 1)
        self.assertEqual(self.alice.client.waiting, {})
        self.assertEqual(self.alice.client.state.unsent, {})
        self.assertEqual(self.alice.shown, [])
        self.assertEqual((self.alice.client.state.last_seq, self.cursor(self.alice)), (1, 1))

    def test_queued_while_disconnected(self) -> None:
        """A message sent while the connection is down is queued, goes out
        after the next RESUMED (a first transmission, not a retransmit) and is
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
        self.assertEqual(self.alice.client.resumes, 1)
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
        self.assertEqual(lost, P.MsgA(1, msg_id, 1))
        self.settle()
        self.assertEqual((out.state, out.transmissions), (SENT, 1))
        self.wait(4)
        self.assertEqual((out.state, out.transmissions), (SENT, 1))
        self.wait(1)
        self.assertEqual((out.state, out.msg_id, out.seq), (STORED, msg_id, 1))
        self.assertEqual(self.alice.statuses, [(1, STORED, msg_id)])
        self.assertEqual((out.transmissions, self.alice.client.retransmits), (2, 1))
        self.assertEqual(len(self.alice.links), 1)
        self.assertEqual(self.inbox_size(carol_uid), 1)
        self.assertEqual(self.h.messenger.duplicates, 1)
        self.wait(10)
        self.assertEqual(out.transmissions, 2)
        self.assertEqual(self.alice.shown, [])

    def test_ack_n_before_msg_a(self) -> None:
        """When the MSG_A is lost but the receiver's ACK_N arrives, the
        ACK_N's seq names no message the client knows yet: the message stays
        in the ack-wait queue, goes again, and the repeated MSG_A (with its
        ACK_N) makes it stored, then delivered; the server stores it once."""
        out = self.alice.client.send(self.bob_uid, "quick")
        self.to_server(self.alice)
        msg_id = self.msg_id_of(self.alice_uid, 1)
        self.alice.link.lose_to_client(P.MsgA)
        self.settle()
        self.assertEqual((out.state, out.msg_id), (SENT, None))
        self.assertEqual(list(self.alice.client.waiting), [1])
        self.wait(5)
        self.assertEqual((out.state, out.msg_id, out.seq), (DELIVERED, msg_id, 1))
        self.assertEqual(self.alice.statuses, [(1, STORED, msg_id), (1, DELIVERED, msg_id)])
        self.assertEqual(self.alice.client.waiting, {})
        self.assertEqual(self.alice.client.state.unsent, {})
        self.assertEqual(self.count("SELECT count(*) FROM messages"), 1)
        self.wait(10)
        self.assertEqual(out.transmissions, 2)

    def test_early_ack_n_kept_for_its_msg_a(self) -> None:
        """An ACK_N that overtakes the MSG_A of its message (several nodes)
        is kept, and makes the message delivered as soon as the MSG_A
        names its seq."""
        out = self.alice.client.send(self.bob_uid, "overtaken")
        self.settle()
        self.assertEqual(out.state, DELIVERED)
        client = self.alice.client
        late = Outgoing(99, self.bob_uid, "late", P.KIND_USER)
        client.waiting[99] = late
        client._on_ack_n(P.AckN(7))
        self.assertEqual(late.state, SENT)
        client._on_msg_a(P.MsgA(99, 4242, 7))
        self.assertEqual((late.state, late.seq), (DELIVERED, 7))
        self.assertEqual(client.undelivered, {})

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


class CmidTests(SDKTestCase):
    def test_cmids_continue_above_last_cmid(self) -> None:
        """A device that signs in again with a counter that went back (its
        state lost, the device id kept) goes on above WELCOME's last_cmid:
        its next message is a new message, not taken for an old one."""
        alice = self.device("alice")
        self.start(alice)
        bob = self.device("bob")
        self.start(bob)
        for i in range(3):
            alice.client.send(self.bob_uid, f"old {i}")
        self.settle()
        stopped = alice.client.stop()
        self.settle()
        self.successResultOf(stopped)
        state = ClientState(next_cmid=1, device_id=alice.client.state.device_id)
        again = self.device("alice", state=state)
        self.start(again)
        self.assertEqual(state.next_cmid, 4)
        out = again.client.send(self.bob_uid, "new")
        self.settle()
        self.assertEqual((out.cmid, out.state), (4, DELIVERED))
        self.assertEqual([m.body for m in bob.shown], ["old 0", "old 1", "old 2", "new"])
        self.assertEqual(again.client.renumbered, 0)

    def test_409_takes_a_new_cmid(self) -> None:
        """When the server holds a cmid for another message (ERROR 409 with
        ref), the message takes a cmid above every one known and goes again:
        the same Outgoing ends delivered with its new cmid, the receiver is
        shown it once, and the old messages are untouched."""
        alice = self.device("alice")
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        olds = [alice.client.send(self.bob_uid, f"old {i}") for i in range(5)]
        self.settle()
        alice.client.state.next_cmid = 2  # the counter went back (a restored backup)
        outs = [alice.client.send(self.bob_uid, f"new {i}") for i in range(2)]
        self.assertEqual([o.cmid for o in outs], [2, 3])
        self.settle()
        self.assertEqual([o.state for o in outs], [DELIVERED, DELIVERED])
        self.assertTrue(all(o.cmid > 5 for o in outs), [o.cmid for o in outs])
        self.assertEqual(len({o.cmid for o in outs}), 2)
        self.assertGreater(alice.client.state.next_cmid, max(o.cmid for o in outs))
        # a renumbered message goes after those sent meanwhile: no order
        # among the two is promised
        self.assertEqual([m.body for m in bob.shown][:5], [f"old {i}" for i in range(5)])
        self.assertEqual(sorted(str(m.body) for m in bob.shown[5:]), ["new 0", "new 1"])
        self.assertEqual(self.count("SELECT count(*) FROM messages"), 7)
        self.assertEqual({o.state for o in olds}, {DELIVERED})
        self.assertGreaterEqual(alice.client.renumbered, 2)
        self.assertEqual(alice.client.waiting, {})
        self.assertEqual(alice.client.state.unsent, {})
        self.assertEqual(alice.shown, [])


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
        after the reconnect (RESUMED's acked is behind), so the sender
        learns the message was delivered."""
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
        self.assertEqual(bob.http.requests, [])


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
        """With an empty timeline the client makes no HTTP request after WELCOME."""
        bob = self.device("bob")
        self.start(bob)
        self.assertEqual(bob.http.requests, [])

    def test_gap_pulls_the_inbox(self) -> None:
        """A MSG_N whose seq skips one (the one before was lost) makes the
        client pull the timeline over HTTP; it shows the messages in seq
        order, each once, and acks up to the last."""
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
        """A MSG_N whose seq skips the next one is held back, the timeline is
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

    def test_gap_under_own_seq_pulled_later(self) -> None:
        """A lost MSG_N below the seq of the sender's own MSG_A leaves a gap
        no later push shows: after resend_after seconds the client pulls it,
        shows the missing message, skips its own entry and acks both."""
        alice = self.device("alice")
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        bob.client.send(self.alice_uid, "lost on the way")
        self.to_server(bob)
        self.assertEqual(len(alice.link.lose_to_client(P.MsgN)), 1)
        self.settle()
        self.h.messenger._awaiting.clear()  # the server does not retransmit
        out = alice.client.send(self.bob_uid, "mine")
        self.settle()
        self.assertEqual((out.state, out.seq), (DELIVERED, 2))
        self.assertEqual(alice.client.state.mine, {2})
        self.assertEqual((alice.client.state.last_seq, self.cursor(alice)), (0, 0))
        self.wait(7)
        self.assertEqual(alice.http.requests, [("GET", "/v1/inbox?after=0&limit=500")])
        self.assertEqual([(m.seq, m.body) for m in alice.shown], [(1, "lost on the way")])
        self.assertEqual((alice.client.state.last_seq, self.cursor(alice)), (2, 2))
        self.assertEqual(alice.client.state.mine, set())


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

    def test_delivered_from_the_pulled_timeline(self) -> None:
        """A pulled timeline entry of the client's own message with
        ``delivered`` makes that message delivered (its ACK_N was lost), and
        is not shown."""
        alice = self.device("alice")
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        bob.client.send(self.alice_uid, "lost on the way")
        self.to_server(bob)
        self.assertEqual(len(alice.link.lose_to_client(P.MsgN)), 1)
        self.settle()
        self.h.messenger._awaiting.clear()  # the server does not retransmit
        out = alice.client.send(self.bob_uid, "seen?")
        self.to_server(alice)
        bob.link.pump.flush()  # the MSG_N reaches bob
        self.h.turn()  # bob writes ACK_R
        self.to_server(bob)  # the server writes ACK_N to alice
        self.assertEqual(alice.link.lose_to_client(P.AckN), [P.AckN(2)])
        self.settle()
        self.assertEqual((out.state, out.seq), (STORED, 2))
        self.assertEqual(bob.shown[0].body, "seen?")
        self.wait(7)  # the gap below seq 2 is pulled
        self.assertEqual(alice.http.requests, [("GET", "/v1/inbox?after=0&limit=500")])
        self.assertEqual(out.state, DELIVERED)
        self.assertEqual(alice.client.undelivered, {})
        self.assertEqual([m.body for m in alice.shown], ["lost on the way"])


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
    def test_a_second_device_kicks_nobody(self) -> None:
        """Two devices of one user (two installations, two device ids) are
        signed in at once: neither is kicked, both stay connected."""
        phone = self.device("alice", device="phone")
        tablet = self.device("alice", device="tablet")
        self.start(phone)
        self.start(tablet)
        self.wait(120)
        for device in (phone, tablet):
            self.assertEqual(len(device.links), 1)
            self.assertTrue(device.client.connected)
            self.assertEqual(device.lost, [])
        self.assertEqual(len(self.h.router.user(self.alice_uid).devices), 2)

    def test_session_ended_stops_the_client(self) -> None:
        """KICKED 2 (expired), 4 (account disabled) and 5 (signed out) end
        the session: the client forgets it, tells the app once with the
        reason, and does not reconnect."""
        for i, (reason, lost) in enumerate(((P.KICKED_EXPIRED, EXPIRED),
                                            (P.KICKED_DISABLED, DISABLED),
                                            (P.KICKED_SIGNED_OUT, SIGNED_OUT))):
            add_user(self.h.store, f"user{i}")
            device = self.device(f"user{i}")
            self.start(device)
            self.h.sessions.end(self.server_device(device), reason)
            self.settle()
            self.wait(60)
            self.assertEqual(device.lost, [lost])
            self.assertEqual(device.client.lost, lost)
            self.assertIsNone(device.client.state.session)
            self.assertEqual(len(device.links), 1)
            self.assertFalse(device.client.connected)

    def test_signed_out_from_this_device(self) -> None:
        """sign_out() (DELETE /v1/devices/current) ends this device's session:
        KICKED 5, "signed out", no reconnect."""
        alice = self.device("alice")
        self.start(alice)
        d = alice.client.sign_out()
        self.settle()
        self.successResultOf(d)
        self.assertEqual(alice.http.requests, [("DELETE", "/v1/devices/current")])
        self.assertEqual(alice.lost, [SIGNED_OUT])
        self.wait(30)
        self.assertEqual(len(alice.links), 1)

    def test_devices_listed(self) -> None:
        """devices() lists the user's signed-in devices, this one marked current."""
        phone = self.device("alice", device="phone")
        tablet = self.device("alice", device="tablet")
        self.start(phone)
        self.start(tablet)
        d = phone.client.devices()
        self.settle()
        devices = self.successResultOf(d)
        self.assertEqual(sorted((e["name"], e["current"]) for e in devices),
                         [("phone", True), ("tablet", False)])

    def test_server_shutdown_resumes(self) -> None:
        """KICKED 3 (the server stops): the client waits a jittered while (at
        least half a second, at most a few), reconnects and RESUMEs; nothing
        is lost and the app is told nothing."""
        alice = self.device("alice")
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        self.h.factory.kick_all(P.KICKED_SHUTDOWN)
        self.settle()
        self.assertFalse(alice.client.connected)
        self.h.reactor.advance(0.4)
        self.settle()
        self.assertEqual(len(alice.links), 1)
        out = alice.client.send(self.bob_uid, "after the restart")
        self.wait(6)
        self.assertEqual(len(alice.links), 2)
        self.assertEqual((alice.client.logins, alice.client.resumes), (1, 1))
        self.assertEqual(alice.lost, [])
        self.assertEqual(out.state, DELIVERED)
        self.assertEqual([m.body for m in bob.shown], ["after the restart"])


class FileStateTests(SDKTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.path = self.mktemp()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def saved(self, path: str | None = None) -> dict[str, Any]:
        with open(path or self.path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
        return data

    def test_state_file_private_without_password(self) -> None:
        """The state file is written with mode 0600; it keeps the device id,
        the session with its nonce counter, the cmid counter, the last seq,
        the servers; never the password."""
        add_user(self.h.store, "carol", "secret-pw-1")
        alice = self.device("carol", password="secret-pw-1", state=FileState(self.path))
        self.start(alice)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        self.assertNotIn("secret-pw-1", text)
        data = json.loads(text)
        self.assertEqual(bytes.fromhex(data["device_id"]), alice.client.state.device_id)
        self.assertEqual(set(data["session"]),
                         {"uid", "session_id", "session_key", "token", "nonce"})
        self.assertEqual(data["last_seq"], 0)
        alice.link.cut()
        self.wait(2)  # a RESUME: the nonce used is saved
        self.assertEqual(alice.client.resumes, 1)
        self.assertGreaterEqual(self.saved()["session"]["nonce"], (NOW + 1) * 1_000_000)
        self.assertEqual(FileState(self.path).device_id, alice.client.state.device_id)
        os.chmod(self.path, 0o644)
        alice.client.send(self.bob_uid, "rewritten")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_version_1_state_file(self) -> None:
        """A state file without a device id (written by a version-1 client)
        gets a new device id and loses its session: the client signs in with
        the password; its counters are kept."""
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump({"next_cmid": 42, "last_seq": 0, "unsent": {},
                       "session": {"uid": self.alice_uid, "session_id": "00" * 16,
                                   "session_key": "00" * 32, "token": "t"}}, f)
        state = FileState(self.path)
        self.assertIsNone(state.session)
        self.assertEqual(len(state.device_id), 16)
        alice = self.device("alice", state=state)
        self.start(alice)
        self.assertEqual((alice.client.logins, alice.client.resumes), (1, 0))
        self.assertEqual(alice.client.send(self.bob_uid, "hi").cmid, 42)

    def test_new_state_file_is_a_new_device(self) -> None:
        """A fresh state file (a new phone, a reinstall) is a new device with
        cmids of its own: its first message is a new message, and the old
        phone's session is left alone."""
        alice = self.device("alice", state=FileState(self.path))
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        first = alice.client.send(self.bob_uid, "from the old phone")
        self.settle()
        other = self.path + ".new"
        phone = self.device("alice", state=FileState(other))
        self.start(phone)
        self.assertNotEqual(phone.client.state.device_id, alice.client.state.device_id)
        second = phone.client.send(self.bob_uid, "from the new phone")
        self.settle()
        self.assertNotEqual(second.msg_id, first.msg_id)
        self.assertEqual([m.body for m in bob.shown], ["from the old phone", "from the new phone"])
        self.assertTrue(alice.client.connected)
        self.assertEqual(alice.lost, [])
        # the new phone pulled the user's timeline: the old phone's message
        # is a copy there
        self.assertEqual(phone.shown, [Message(*_stored(first), self.alice_uid,
                                               "from the old phone", NOW, None, self.bob_uid)])
        self.assertEqual([m.body for m in alice.copies()], ["from the new phone"])

    def test_restart_keeps_cmids_and_seqs(self) -> None:
        """A new Client with a FileState on the same file resumes the session
        without the password, continues the cmid counter and shows only what
        it has not shown before."""
        alice = self.device("alice")
        self.start(alice)
        bob = self.device("bob", state=FileState(self.path))
        self.start(bob)
        alice.client.send(self.bob_uid, "one")
        alice.client.send(self.bob_uid, "two")
        self.settle()
        first = bob.client.send(self.alice_uid, "bob's first")
        self.settle()
        self.assertGreater(first.cmid, 1_700_000_000_000)  # a fresh file starts at the clock
        self.assertEqual([m.body for m in bob.shown], ["one", "two"])
        self.assertEqual(first.seq, 3)
        stopped = bob.client.stop()
        self.settle()
        self.successResultOf(stopped)
        alice.client.send(self.bob_uid, "three")
        self.settle()
        saved = self.saved()
        self.assertEqual((saved["next_cmid"], saved["last_seq"], saved["unsent"]),
                         (first.cmid + 1, 3, {}))

        again = self.device("bob", password=None, state=FileState(self.path))
        self.start(again)
        self.assertEqual(again.client.resumes, 1)
        self.assertEqual(again.http.requests, [("GET", "/v1/inbox?after=3&limit=500")])
        self.assertEqual([(m.seq, m.body) for m in again.shown], [(4, "three")])
        second = again.client.send(self.alice_uid, "bob's second")
        self.settle()
        self.assertEqual(second.cmid, first.cmid + 1)
        self.assertEqual(second.state, DELIVERED)
        self.assertNotEqual(second.msg_id, first.msg_id)
        self.assertEqual(self.inbox_size(self.alice_uid), 5)  # 3 sent, 2 received

    def test_unsent_messages_sent_after_restart(self) -> None:
        """Messages without MSG_A when the app died are in the file and are sent
        by the next run: one whose MSG_A was lost gets its first msg_id (no
        second copy, and its own timeline entry is not shown), one queued
        offline (a bytes body) is stored now."""
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
        again = self.device("alice", password=None, state=state)
        self.assertEqual(sorted(again.client.waiting), [c1, c2])
        self.start(again)  # resumes the session the dead app left lingering
        self.assertEqual(again.client.resumes, 1)
        final = {cmid: (state, msg) for cmid, state, msg in again.statuses}
        self.assertEqual(final[c1], (DELIVERED, msg_id))
        self.assertIn((c2, STORED, self.msg_id_of(self.alice_uid, c2)), again.statuses)
        self.assertEqual([m.body for m in bob.shown], ["reached the server", b"\x00queued\xff"])
        self.assertEqual(self.inbox_size(self.bob_uid), 2)
        self.assertEqual(again.client.waiting, {})
        self.assertEqual(again.shown, [])
        self.assertEqual(FileState(self.path).unsent, {})
        self.assertEqual(FileState(self.path).next_cmid, c2 + 1)
        self.assertEqual(FileState(self.path).last_seq, 2)


class RestoredBackupTests(SDKTestCase):
    """A phone restored from a backup: its state file goes back in time."""

    def test_restored_state_sends_every_message_once(self) -> None:
        """alice's state file is replaced by an older copy of itself (after
        messages were sent and received, with two messages unsent at backup
        time that were stored later).  The restored client RESUMEs (its
        nonce beats the ones used since the backup), its counter is behind
        the server's cmids (ERROR 409, new cmids), and it keeps sending:
        every message of alice reaches bob exactly once, every outgoing
        message of the restored client ends stored and delivered, and the
        restored phone shows again what it lost: bob's messages, and alice's
        own sent after the backup as copies, each once."""
        path = self.mktemp()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        backup = path + ".backup"
        bob = self.device("bob")
        self.start(bob)
        alice = self.device("alice", state=FileState(path))
        self.start(alice)
        for i in range(3):
            alice.client.send(self.bob_uid, f"before {i}")
        bob.client.send(self.alice_uid, "bob before")
        self.settle()
        alice.link.cut()
        for i in range(2):
            alice.client.send(self.bob_uid, f"unsent at backup {i}")
        shutil.copy(path, backup)  # unsent: 2, the session with its nonce
        self.wait(2)  # RESUMED: the two go out
        for i in range(5):
            alice.client.send(self.bob_uid, f"after backup {i}")
        bob.client.send(self.alice_uid, "bob after backup")
        self.settle()
        alice.link.cut()
        self.wait(2)  # one more RESUME: a greater nonce than the backup's
        self.assertEqual(alice.client.resumes, 2)
        stopped = alice.client.stop()
        self.settle()
        self.successResultOf(stopped)
        self.wait(3)

        shutil.copy(backup, path)  # the phone is restored
        restored = self.device("alice", password=None, state=FileState(path))
        self.assertEqual(len(restored.client.waiting), 2)
        self.start(restored)
        self.assertEqual((restored.client.logins, restored.client.resumes), (0, 1))
        news = [restored.client.send(self.bob_uid, f"restored {i}") for i in range(10)]
        self.settle()
        self.wait(12)
        sent = ([f"before {i}" for i in range(3)] + [f"unsent at backup {i}" for i in range(2)]
                + [f"after backup {i}" for i in range(5)] + [f"restored {i}" for i in range(10)])
        self.assertEqual(sorted(str(m.body) for m in bob.shown), sorted(sent))
        self.assertEqual(self.count("SELECT count(*) FROM messages WHERE sender = ?",
                                    self.alice_uid), 20)
        self.assertEqual([o.state for o in news], [DELIVERED] * 10)
        self.assertEqual(len({o.cmid for o in news}), 10)
        self.assertEqual(restored.client.waiting, {})
        self.assertEqual(FileState(path).unsent, {})
        self.assertEqual(
            {cmid: state for cmid, state, _ in restored.statuses if state == DELIVERED}.keys(),
            {o.cmid for o in news} | set(FileState(backup).unsent))
        self.assertGreater(restored.client.renumbered, 0)
        # what the restored phone shows: each entry it lost, once
        self.assertEqual([m.body for m in restored.shown if m.sender == self.bob_uid],
                         ["bob after backup"])
        self.assertEqual([m.body for m in restored.copies()],
                         [f"after backup {i}" for i in range(5)])
        self.assertTrue(all(m.to == self.bob_uid for m in restored.copies()))
        self.assertEqual(len({m.seq for m in restored.shown}), len(restored.shown))
        self.wait(int(OWN_ACK_DELAY))  # its own last messages are acked lazily
        self.assertEqual(self.cursor(restored), self.inbox_size(self.alice_uid))


class TwoDevicesOfOneUserTests(SDKTestCase):
    """alice on a phone and a tablet (two device ids), bob on one device."""

    def setUp(self) -> None:
        super().setUp()
        self.phone = self.device("alice", device="phone")
        self.tablet = self.device("alice", device="tablet")
        self.bob = self.device("bob")
        for device in (self.phone, self.tablet, self.bob):
            self.start(device)

    def test_both_send_at_once(self) -> None:
        """The phone and the tablet send to bob at once, interleaved (their
        cmids overlap: each device counts from 1): every message of both
        arrives at bob exactly once, each ends delivered on its device, and
        each device shows the other's messages as copies (with ``to``) and
        none of its own."""
        phone_outs, tablet_outs = [], []
        for i in range(20):
            phone_outs.append(self.phone.client.send(self.bob_uid, f"phone {i}"))
            tablet_outs.append(self.tablet.client.send(self.bob_uid, f"tablet {i}"))
            if i % 3 == 0:
                self.settle(2)
        self.settle()
        self.wait(6)
        self.assertEqual([o.cmid for o in phone_outs], [o.cmid for o in tablet_outs])
        bodies = [str(m.body) for m in self.bob.shown]
        self.assertEqual(sorted(bodies),
                         sorted([f"phone {i}" for i in range(20)]
                                + [f"tablet {i}" for i in range(20)]))
        self.assertEqual([b for b in bodies if b.startswith("phone")],
                         [f"phone {i}" for i in range(20)])
        self.assertEqual({o.state for o in phone_outs + tablet_outs}, {DELIVERED})
        for device, outs, other in ((self.phone, phone_outs, tablet_outs),
                                    (self.tablet, tablet_outs, phone_outs)):
            self.assertFalse({m.msg_id for m in device.shown} & {o.msg_id for o in outs})
            copies = device.copies()
            self.assertEqual(copies, device.shown)
            self.assertEqual([m.body for m in copies], [o.body for o in other])
            self.assertEqual([(m.msg_id, m.seq, m.to) for m in copies],
                             [(o.msg_id, o.seq, self.bob_uid) for o in other])
            self.assertEqual(device.client.state.last_seq, 40)
            self.assertEqual(self.cursor(device), 40)
            self.assertEqual(device.client.waiting, {})

    def test_copies_of_group_messages(self) -> None:
        """A group message sent from the phone is a copy on the tablet, with
        ``group`` set and no ``to``."""
        d = self.h.store.create_group("g", self.alice_uid, [self.bob_uid], NOW)
        self.h.turn()
        gid = self.successResultOf(d)
        out = self.phone.client.send(gid, "to the group", P.KIND_GROUP)
        self.settle()
        self.assertEqual(out.state, STORED)
        self.assertEqual(self.tablet.shown, [Message(*_stored(out), self.alice_uid,
                                                     "to the group", NOW, gid, None)])
        self.assertEqual(self.phone.shown, [])

    def test_same_body_pulled_before_the_msg_a(self) -> None:
        """The phone and the tablet both send "ok" to bob; the phone's MSG_A
        is lost, so its pull finds two of the user's own "ok" entries it
        cannot tell apart: it holds them until the repeated MSG_A names its
        own, then shows the tablet's as a copy, once."""
        mine = self.phone.client.send(self.bob_uid, "ok")
        self.to_server(self.phone)
        self.phone.link.lose_to_client(P.MsgA)
        self.settle()
        theirs = self.tablet.client.send(self.bob_uid, "ok")
        self.to_server(self.tablet)
        self.phone.link.lose_to_client(P.MsgN)  # the copy is lost too
        self.settle()
        self.phone.link.cut()
        self.wait(2)
        self.assertEqual(mine.state, DELIVERED)
        self.assertEqual(self.phone.shown, [Message(*_stored(theirs), self.alice_uid,
                                                    "ok", NOW, None, self.bob_uid)])
        self.assertEqual(self.phone.client._unsure, {})
        self.assertEqual([m.body for m in self.bob.shown], ["ok", "ok"])


class OneStateFileTwiceTests(SDKTestCase):
    """Two clients started on one state file: one device id."""

    def setUp(self) -> None:
        super().setUp()
        self.path = self.mktemp()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def test_resume_kicks_the_first_once(self) -> None:
        """The second client RESUMEs the session the first holds: the first
        gets KICKED 1, stops and tells the app ("replaced"), and writes the
        state file no more; the second stays connected.  Nobody reconnects:
        no loop of kicks."""
        first = self.device("alice", state=FileState(self.path))
        self.start(first)
        second = self.device("alice", password=None, state=FileState(self.path))
        self.start(second)
        self.assertEqual(first.lost, [REPLACED])
        self.assertEqual(first.client.lost, REPLACED)
        self.assertFalse(first.client.connected)
        first.client.send(self.bob_uid, "from the replaced one")  # not written down
        out = second.client.send(self.bob_uid, "from the second")
        self.wait(120)
        self.assertEqual((len(first.links), len(second.links)), (1, 1))
        self.assertTrue(second.client.connected)
        self.assertEqual(second.lost, [])
        self.assertEqual(out.state, STORED)
        self.assertEqual((second.client.logins, second.client.resumes), (0, 1))
        saved = FileState(self.path)
        self.assertEqual(saved.session, second.client.state.session)
        self.assertEqual(list(saved.unsent), [])
        self.assertEqual(len(self.h.router.user(self.alice_uid).devices), 1)

    def test_login_kicks_the_first_once(self) -> None:
        """Both clients sign in with the password and the file's device id:
        the second LOGIN replaces the first's session, the first gets
        KICKED 1 and stops for good ("replaced")."""
        FileState(self.path).save()  # the installation's device id
        first = self.device("alice", state=FileState(self.path))
        second = self.device("alice", state=FileState(self.path))
        self.assertEqual(first.client.state.device_id, second.client.state.device_id)
        self.start(first)
        self.start(second)
        self.wait(120)
        self.assertEqual(first.lost, [REPLACED])
        self.assertEqual(second.lost, [])
        self.assertEqual((len(first.links), len(second.links)), (1, 1))
        self.assertTrue(second.client.connected)
        self.assertEqual(first.client.logins + second.client.logins, 2)


class NoticeTests(SDKTestCase):
    def test_unreachable_told_once_then_reachable(self) -> None:
        """While the server cannot be reached the client keeps trying with
        backoff; after unreachable_after seconds the app is told once (not
        fatal), messages stay "sent"; when the server is back the app is told
        so and the messages go."""
        alice = self.device("alice", unreachable_after=20, max_backoff=8)
        bob = self.device("bob")
        self.start(alice)
        self.start(bob)
        alice.refuse = True
        alice.link.cut()
        out = alice.client.send(self.bob_uid, "waiting")
        self.wait(19)
        self.assertEqual(alice.notices, [])
        self.wait(2)
        self.assertIn("refused", alice.notices[0][1])
        self.assertEqual([kind for kind, _ in alice.notices], ["unreachable"])
        self.wait(60)
        self.assertEqual([kind for kind, _ in alice.notices], ["unreachable"])
        self.assertEqual((out.state, alice.lost), (SENT, []))
        alice.refuse = False
        self.wait(10)
        self.assertEqual([kind for kind, _ in alice.notices], ["unreachable", "reachable"])
        self.assertEqual(out.state, DELIVERED)

    def test_tls_refused_told(self) -> None:
        """A TLS handshake that fails (the server's certificate is not
        trusted) is told to the app once, not fatal: the client goes on
        trying, and says when it is through."""
        from OpenSSL import SSL

        alice = self.device("alice")
        self.start(alice)
        client = alice.client
        client._wire = None  # the old connection is gone
        client._logged_in = False
        for _ in range(3):
            wire = _Wire(client, ("10.0.0.9", 5858, True))
            wire.makeConnection(StringTransport())
            wire.connectionLost(_failure(SSL.Error(
                [("SSL routines", "", "certificate verify failed")])))
        self.assertEqual([kind for kind, _ in alice.notices], ["tls"])
        self.assertIn("certificate verify failed", alice.notices[0][1])
        self.assertEqual(alice.lost, [])
        self.wait(5)
        self.assertTrue(client.connected)
        self.assertEqual([kind for kind, _ in alice.notices], ["tls", "reachable"])


    def test_no_answer_to_resume(self) -> None:
        """A connection on which RESUME gets no answer is given up after
        SIGN_IN_TIMEOUT seconds, and the client tries again."""
        alice = self.device("alice")
        self.start(alice)
        alice.link.cut()
        self.h.reactor.advance(2)
        self.assertEqual(len(alice.links), 2)
        silent = alice.link
        self.links.remove(silent)  # nothing moves on it
        for _ in range(int(SIGN_IN_TIMEOUT) + 1):
            self.h.reactor.advance(1)
        self.assertTrue(silent.pump.clientIO.disconnecting)
        silent.pump.flush()
        self.wait(3)
        self.assertEqual(len(alice.links), 3)
        self.assertTrue(alice.client.connected)
        self.assertEqual(alice.lost, [])


class TerminalTests(SynchronousTestCase):
    """The terminal client's lines (``im58d.client.cli``)."""

    def terminal(self) -> tuple[Terminal, StringTransport, Client]:
        client = Client(Clock(), None, None, HTTP_URL, "alice", "pw",
                        state=ClientState(next_cmid=1))
        client.uid = 5
        done: Deferred[None] = Deferred()
        terminal = Terminal(client, done)
        transport = StringTransport()
        terminal.makeConnection(transport)
        transport.clear()
        return terminal, transport, client

    def lines(self, transport: StringTransport) -> list[str]:
        text = transport.value().decode("utf-8")
        transport.clear()
        return [line.split("] ", 1)[-1] for line in text.splitlines()]

    def test_copies_and_messages(self) -> None:
        """A received message shows its sender; a copy of the user's own
        message from another device shows "you → UID" or "you → #GID"."""
        terminal, transport, _ = self.terminal()
        show_message(terminal, Message(1, 1, 7, "hello", NOW))
        show_message(terminal, Message(2, 2, 5, "hi there", NOW, None, 7))
        show_message(terminal, Message(3, 3, 5, "all of you", NOW, 9))
        show_message(terminal, Message(4, 4, 8, "in the group", NOW, 9))
        self.assertEqual(self.lines(transport),
                         ["7: hello", "you → 7: hi there", "you → #9: all of you",
                          "#9 8: in the group"])

    def test_one_line_each(self) -> None:
        """Unreachable, TLS refused, back again, ONLINE and a lost session
        each print one line; a lost session ends the run."""
        terminal, transport, client = self.terminal()
        watch(terminal)
        watch_session(terminal)
        client.on_unreachable("connection refused")
        client.on_tls_refused("certificate verify failed")
        client.on_reachable()
        client.on_online((3, 4))
        client.on_changed("requests", 2)
        client.on_session_lost(REPLACED)
        lines = self.lines(transport)
        self.assertEqual(len(lines), 6)
        self.assertIn("unreachable", lines[0])
        self.assertIn("TLS refused", lines[1])
        self.assertIn("connected again", lines[2])
        self.assertIn("3, 4", lines[3])
        self.assertIn("friend requests", lines[4])
        self.assertIn("another client of this device", lines[5])
        self.assertTrue(terminal.done.called)


class _Page:
    """An HTTP response of /v1/inbox as the SDK reads it."""

    def __init__(self, messages: list[tuple[int, str]], inbox_max: int,
                 sender: int = 1, to: int | None = None) -> None:
        self.code = 200
        self._body = {
            "messages": [
                dict({"seq": seq, "msg_id": seq, "from": sender, "body": body, "ts": 0},
                     **({"to": to} if to is not None else {}))
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
    def client(self) -> tuple[Client, HeldHTTP, list[Message]]:
        http = HeldHTTP()
        state = ClientState(next_cmid=1)
        state.last_seq = 0
        client = Client(Clock(), None, None, HTTP_URL, "bob", "pw", state=state, http=http)
        shown: list[Message] = []
        client.on_message = shown.append
        client.token = "t"
        client.uid = 2
        return client, http, shown

    def test_push_past_the_gap_during_a_pull(self) -> None:
        """A MSG_N that arrives while a pull is under way, past a seq the
        pull's page does not cover (a message stored after the page was read,
        its push lost), is not left waiting for the next push: the pull goes
        on until nothing is held ahead, and all are shown in order."""
        client, http, shown = self.client()
        client._on_msg_n(P.MsgN(2, 2, 1, "two", 0))  # 1 is missing: a pull
        [(query, first)] = http.asked
        self.assertEqual(query, "inbox?after=0&limit=500")
        client._on_msg_n(P.MsgN(4, 4, 1, "four", 0))  # 3 stored after the page was read
        first.callback(_Page([(1, "one"), (2, "two")], 2))
        self.assertEqual([m.seq for m in shown], [1, 2])
        [_, (query, second)] = http.asked
        self.assertEqual(query, "inbox?after=2&limit=500")
        second.callback(_Page([(3, "three"), (4, "four")], 4))
        self.assertEqual([m.seq for m in shown], [1, 2, 3, 4])
        self.assertEqual(len(http.asked), 2)

    def test_own_entry_held_until_the_msg_a(self) -> None:
        """A pulled entry of the user's own that a waiting message of this
        device may be (same receiver, same body, MSG_A not here) is held: not
        shown when the MSG_A names it, shown as a copy when the MSG_A names
        another message."""
        client, http, shown = self.client()
        out = client.send(1, "same")
        client._pull()
        [(_, page)] = http.asked
        page.callback(_Page([(1, "same"), (2, "same")], 2, sender=2, to=1))
        self.assertEqual(shown, [])
        self.assertEqual(client.state.last_seq, 2)
        client._on_msg_a(P.MsgA(out.cmid, 2, 2))  # entry 2 was this device's
        self.assertEqual((out.state, out.seq), (STORED, 2))
        self.assertEqual(shown, [Message(1, 1, 2, "same", 0, None, 1)])
        self.assertEqual(client._unsure, {})
