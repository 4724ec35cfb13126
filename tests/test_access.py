"""The access layer: login, the pre-login rule, errors, heartbeat and sessions."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from im58d.wire import packets as P
from im58d.wire import varint

from .support import Harness, add_user, immediate_verify


def db_dump(harness: Harness) -> list[str]:
    db = harness.store._db
    assert db is not None
    return list(db.conn.iterdump())


class LoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.alice = add_user(self.h.store, "alice", "secret")

    def test_welcome(self) -> None:
        """LOGIN with good credentials gets WELCOME with the contract's fields."""
        client = self.h.connect()
        client.send(P.Login("alice", "secret", "phone", "app/1.0"))
        [welcome] = client.received()
        self.assertIsInstance(welcome, P.Welcome)
        self.assertEqual(welcome.uid, self.alice)
        self.assertEqual(len(welcome.session_id), 16)
        self.assertEqual(len(welcome.session_key), 32)
        self.assertTrue(welcome.token)
        self.assertEqual(
            (welcome.inbox_max, welcome.heartbeat_s, welcome.linger_s, welcome.iplist_version),
            (0, 240, 300, 7),
        )
        session = self.h.router.session_for(self.alice)
        self.assertEqual(session.token, welcome.token)
        self.assertEqual(session.device, "phone")
        self.assertIs(session.connection, client.protocol)
        self.assertFalse(client.closed)

    def test_bad_password_and_unknown_user_look_alike(self) -> None:
        """A wrong password and an unknown user get the same ERROR 401 and a close."""
        wrong = self.h.connect()
        wrong.send(P.Login("alice", "nope", "phone"))
        unknown = self.h.connect()
        unknown.send(P.Login("mallory", "secret", "phone"))
        answers = [wrong.received(), unknown.received()]
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(answers[0][0].code, 401)
        self.assertTrue(wrong.closed and unknown.closed)
        self.assertIsNone(self.h.router.session_for(self.alice))

    def test_refused_logins_are_logged(self) -> None:
        """Each refused login is one warning naming the uid (or "an unknown
        name") and the address, for fail2ban and the like; neither the typed
        name nor the password is in it."""
        with capturedLogs() as events:
            self.h.connect("192.0.2.7").send(P.Login("alice", "nope", "phone"))
            self.h.connect("192.0.2.8").send(P.Login("hunter2", "hunter2", "phone"))
        lines = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(lines, [
            f"login refused: bad credentials for uid={self.alice} from 192.0.2.7",
            "login refused: bad credentials for an unknown name from 192.0.2.8",
        ])

    def test_too_many_failures_for_a_user(self) -> None:
        """After 5 failed attempts on a name, even the right password gets 429
        until the window has passed."""
        for i in range(5):
            client = self.h.connect(f"10.0.0.{i}")
            client.send(P.Login("alice", "guess", "phone"))
            self.assertEqual(client.received()[0].code, 401)
        client = self.h.connect("10.0.1.1")
        client.send(P.Login("alice", "secret", "phone"))
        self.assertEqual([p.code for p in client.received()], [429])
        self.assertTrue(client.closed)
        self.h.reactor.advance(901)
        self.h.connect("10.0.1.1").login("alice", "secret")

    def test_too_many_failures_from_an_address(self) -> None:
        """20 failed attempts from one address block it (429) for every name;
        other addresses are not affected."""
        for i in range(20):
            client = self.h.connect("10.9.9.9")
            client.send(P.Login(f"user{i}", "guess", "phone"))
            self.assertEqual(client.received()[0].code, 401)
        blocked = self.h.connect("10.9.9.9")
        blocked.send(P.Login("alice", "secret", "phone"))
        self.assertEqual(blocked.received()[0].code, 429)
        self.h.connect("10.8.8.8").login("alice", "secret")

    def test_parallel_attempts_count_before_they_are_checked(self) -> None:
        """Attempts still being verified count against the limit, so a burst
        cannot slip past it."""
        pending: list[Deferred[bool]] = []

        def slow_verify(password: str, encoded: str) -> Deferred[bool]:
            d: Deferred[bool] = Deferred()
            pending.append(d)
            return d

        self.h.auth._verify = slow_verify
        clients = [self.h.connect(f"10.1.0.{i}") for i in range(8)]
        for client in clients:
            client.send(P.Login("alice", "guess", "phone"))
        self.assertEqual(len(pending), 5)
        self.assertEqual([c.received()[0].code for c in clients[5:]], [429] * 3)

    def test_many_users_behind_one_address(self) -> None:
        """Successful logins do not count against their address: 40 users
        behind one NAT log in at the same moment."""
        pending: list[Deferred[bool]] = []

        def slow_verify(password: str, encoded: str) -> Deferred[bool]:
            d: Deferred[bool] = Deferred()
            pending.append(d)
            return d

        for i in range(40):
            add_user(self.h.store, f"user{i}", "secret")
        self.h.auth._verify = slow_verify
        clients = [self.h.connect("192.0.2.1") for i in range(40)]
        for i, client in enumerate(clients):
            client.send(P.Login(f"user{i}", "secret", "phone"))
        self.assertEqual(len(pending), 40)
        for d in pending:
            d.callback(True)
        self.h.turn()
        self.assertEqual({type(c.received()[0]) for c in clients}, {P.Welcome})
        self.h.auth._verify = immediate_verify
        again = self.h.connect("192.0.2.1")
        again.login("alice", "secret")

    def test_flood_of_bad_logins_changes_nothing_stored(self) -> None:
        """Failed logins, garbage and refused packets leave the database as it was."""
        before = db_dump(self.h)
        for i in range(30):
            client = self.h.connect(f"10.2.0.{i % 3}")
            client.send(P.Login("alice" if i % 2 else f"x{i}", "guess", "phone"))
        self.h.connect().send_bytes(b"\x05\x10\xc1\xc1\xc1\xc1")
        self.h.connect().send(P.MsgR(1, self.alice, "hi"))
        self.assertEqual(db_dump(self.h), before)

    def test_disabled_account(self) -> None:
        """A disabled account with the right password gets ERROR 403; with a
        wrong one, 401 as for anyone."""
        db = self.h.store._db
        assert db is not None
        db.execute("UPDATE users SET disabled = 1 WHERE id = ?", (self.alice,))
        client = self.h.connect()
        client.send(P.Login("alice", "secret", "phone"))
        self.assertEqual([p.code for p in client.received()], [403])
        client = self.h.connect()
        client.send(P.Login("alice", "wrong", "phone"))
        self.assertEqual([p.code for p in client.received()], [401])

    def test_packets_after_login_wait_for_welcome(self) -> None:
        """Packets pipelined behind LOGIN are handled after WELCOME, in order."""
        client = self.h.connect()
        client.send(P.Login("alice", "secret", "phone"), P.Ping(), P.Ping())
        packets = client.received()
        self.assertEqual([type(p) for p in packets], [P.Welcome, P.Pong, P.Pong])

    def test_connection_gone_before_login_completes(self) -> None:
        """When the connection drops while the password is checked, no session
        is made."""
        pending: list[Deferred[bool]] = []

        def slow_verify(password: str, encoded: str) -> Deferred[bool]:
            d: Deferred[bool] = Deferred()
            pending.append(d)
            return d

        self.h.auth._verify = slow_verify
        client = self.h.connect()
        client.send(P.Login("alice", "secret", "phone"))
        client.drop()
        pending[0].callback(True)
        self.h.turn()
        self.assertIsNone(self.h.router.session_for(self.alice))
        self.assertEqual(len(self.h.router), 0)

    def test_second_login_kicks_the_first(self) -> None:
        """A new LOGIN of the same user closes the old connection with KICKED 1
        and replaces the session."""
        first = self.h.connect()
        first.login("alice", "secret")
        second = self.h.connect()
        welcome = second.login("alice", "secret")
        self.assertEqual(first.received(), [P.Kicked(P.KICKED_REPLACED)])
        self.assertTrue(first.closed)
        self.assertEqual(self.h.router.session_for(self.alice).token, welcome.token)
        first.drop()
        self.assertIs(self.h.router.session_for(self.alice).connection, second.protocol)


class PreLoginRuleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        add_user(self.h.store, "alice", "secret")

    def test_ping_before_login(self) -> None:
        """PING is answered with PONG before login; the connection stays."""
        client = self.h.connect()
        client.send(P.Ping())
        self.assertEqual(client.received(), [P.Pong()])
        self.assertFalse(client.closed)

    def test_other_packets_before_login(self) -> None:
        """Any client packet but LOGIN, RESUME and PING before login gets
        ERROR 401 and the connection is closed."""
        for packet in (P.MsgR(1, 2, "hi"), P.AckR(1), P.Bye()):
            client = self.h.connect()
            client.send(packet)
            [error] = client.received()
            self.assertEqual(error.code, 401, packet)
            self.assertTrue(client.closed)

    def test_resume_without_session(self) -> None:
        """RESUME for a session the server does not have gets ERROR 409 and the
        connection stays, so the client can LOGIN on it."""
        client = self.h.connect()
        client.send(P.Resume(bytes(16), 1_800_000_000, bytes(8), bytes(16)))
        self.assertEqual([p.code for p in client.received()], [409])
        client.login("alice", "secret")


class ErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        add_user(self.h.store, "alice", "secret")
        self.client = self.h.connect()
        self.client.login("alice", "secret")

    def test_unknown_type_keeps_connection(self) -> None:
        """An unknown packet type gets ERROR 501; the next packet still works."""
        self.client.send_bytes(b"\x03\x7f\x91\x01" + b"\x01\x05")
        packets = self.client.received()
        self.assertEqual([type(p) for p in packets], [P.Error, P.Pong])
        self.assertEqual(packets[0].code, 501)
        self.assertFalse(self.client.closed)

    def test_unknown_type_before_login(self) -> None:
        """An unknown packet type before login is also 501, for forward
        compatibility."""
        client = self.h.connect()
        client.send_bytes(b"\x01\x7e")
        self.assertEqual([p.code for p in client.received()], [501])
        self.assertFalse(client.closed)

    def test_malformed_body(self) -> None:
        """A body that is not MessagePack gets ERROR 400 and a close."""
        self.client.send_bytes(b"\x03\x05\xc1\xc1")
        [error] = self.client.received()
        self.assertEqual(error.code, 400)
        self.assertTrue(self.client.closed)

    def test_wrong_field_type(self) -> None:
        """A field of the wrong type (a string for ACK_R's seq) is a 400 naming it."""
        self.client.send_bytes(b"\x04\x13\x91\xa1x")
        [error] = self.client.received()
        self.assertEqual(error.code, 400)
        self.assertIn("AckR.seq", error.message)
        self.assertTrue(self.client.closed)

    def test_oversized_prefix(self) -> None:
        """A length prefix over the limit gets ERROR 413 and a close before the
        frame is buffered."""
        self.client.send_bytes(varint(65537))
        [error] = self.client.received()
        self.assertEqual(error.code, 413)
        self.assertTrue(self.client.closed)
        self.assertEqual(self.client.protocol.decoder.buffered, 0)

    def test_configured_frame_limit(self) -> None:
        """max_frame from the config is the limit the decoder applies."""
        h = Harness(max_frame=100)
        client = h.connect()
        client.send_bytes(varint(101))
        self.assertEqual([p.code for p in client.received()], [413])

    def test_server_packet_from_client(self) -> None:
        """A server-to-client packet type sent by a client is a 400."""
        self.client.send(P.Pong())
        self.assertEqual([p.code for p in self.client.received()], [400])
        self.assertTrue(self.client.closed)

    def test_login_twice(self) -> None:
        """LOGIN on a logged-in connection is a 400."""
        self.client.send(P.Login("alice", "secret", "phone"))
        self.assertEqual([p.code for p in self.client.received()], [400])

    def test_bad_connection_does_not_disturb_others(self) -> None:
        """Garbage on one connection closes only that one."""
        other = self.h.connect()
        other.send_bytes(b"\xff\xff\xff\xff\xff\xff")
        self.assertTrue(other.closed)
        self.client.send(P.Ping())
        self.assertEqual(self.client.received(), [P.Pong()])
        self.assertFalse(self.client.closed)

    def test_frames_coalesced(self) -> None:
        """Answers to packets that arrive together leave in one write."""
        writes: list[bytes] = []
        transport: Any = self.client.transport
        original = transport.write

        def write(data: bytes) -> None:
            writes.append(data)
            original(data)

        transport.write = write
        self.client.send(P.Ping(), P.Ping(), P.Ping())
        self.assertEqual(writes, [b"\x01\x06" * 3])


class SessionLifeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(login_timeout=60)
        self.alice = add_user(self.h.store, "alice", "secret")
        self.client = self.h.connect()
        self.client.login("alice", "secret")

    def test_bye(self) -> None:
        """BYE ends the session at once and closes the connection."""
        self.client.send(P.Bye())
        self.assertIsNone(self.h.router.session_for(self.alice))
        self.assertTrue(self.client.closed)

    def test_drop_lingers(self) -> None:
        """A drop without BYE keeps the session for linger seconds, then ends it."""
        session = self.h.router.session_for(self.alice)
        self.client.drop()
        self.assertIs(self.h.router.session_for(self.alice), session)
        self.assertIsNone(session.connection)
        self.h.reactor.advance(299)
        self.assertIs(self.h.router.session_for(self.alice), session)
        self.h.reactor.advance(1)
        self.assertIsNone(self.h.router.session_for(self.alice))

    def test_heartbeat_keeps_connection(self) -> None:
        """A client that pings every heartbeat_s stays connected."""
        for _ in range(5):
            self.h.reactor.advance(240)
            self.client.send(P.Ping())
            self.h.factory.sweep()
        self.assertFalse(self.client.closed)

    def test_silent_connection_closed(self) -> None:
        """A connection silent for 2 × heartbeat + 30 s is closed; its session lingers."""
        self.h.reactor.advance(2 * 240 + 30)
        self.h.factory.sweep()
        self.assertFalse(self.client.closed)
        self.h.reactor.advance(1)
        self.h.factory.sweep()
        self.assertTrue(self.client.transport.disconnected)
        self.client.drop()
        self.assertIsNotNone(self.h.router.session_for(self.alice))

    def test_pings_do_not_stand_in_for_a_login(self) -> None:
        """A connection that only pings is still closed login_timeout after it
        was opened."""
        pinger = self.h.connect()
        for _ in range(6):
            self.h.reactor.advance(10)
            pinger.send(P.Ping())
            self.h.factory.sweep()
        self.h.reactor.advance(1)
        self.h.factory.sweep()
        self.assertTrue(pinger.transport.disconnected)

    def test_packets_held_behind_login_are_bounded(self) -> None:
        """A client may queue only 32 packets behind a LOGIN being checked;
        more is ERROR 400 and a close.  Reading stops meanwhile."""
        self.h.auth._verify = lambda password, encoded: Deferred()
        client = self.h.connect()
        client.send(P.Login("alice", "secret", "phone"), *[P.Ping()] * 32)
        self.assertEqual(client.transport.producerState, "paused")
        self.assertFalse(client.closed)
        client.send(P.Ping())
        self.assertEqual([p.code for p in client.received()], [400])
        self.assertTrue(client.closed)

    def test_client_that_does_not_read_is_dropped(self) -> None:
        """A client that leaves the server's writes unread (its buffer stays
        full) for a minute is dropped; its session lingers."""
        self.client.protocol.pauseProducing()  # what the transport does
        self.h.reactor.advance(60)
        self.h.factory.sweep()
        self.assertFalse(self.client.transport.disconnected)
        self.h.reactor.advance(1)
        self.h.factory.sweep()
        self.assertTrue(self.client.transport.disconnected)

    def test_a_client_that_reads_again_stays(self) -> None:
        """A buffer that drains in time keeps the connection."""
        self.client.protocol.pauseProducing()
        self.h.reactor.advance(30)
        self.client.protocol.resumeProducing()
        self.h.reactor.advance(40)
        self.client.send(P.Ping())
        self.h.factory.sweep()
        self.assertFalse(self.client.transport.disconnected)

    def test_login_timeout(self) -> None:
        """A connection that does not log in within login_timeout is closed."""
        idle = self.h.connect()
        idle.send(P.Ping())
        self.h.reactor.advance(61)
        self.h.factory.sweep()
        self.assertTrue(idle.transport.disconnected)
        self.assertFalse(self.client.closed)

    def test_disabled_user_is_kicked(self) -> None:
        """Disabling a logged-in user ends the session with KICKED 4 at the
        next housekeeping round."""
        db = self.h.store._db
        assert db is not None
        db.execute("UPDATE users SET disabled = 1 WHERE id = ?", (self.alice,))
        self.h.sessions.end_disabled()
        self.h.turn()
        self.assertEqual(self.client.received(), [P.Kicked(P.KICKED_DISABLED)])
        self.assertTrue(self.client.closed)
        self.assertIsNone(self.h.router.session_for(self.alice))

    def test_shutdown_kicks(self) -> None:
        """On shutdown every client gets KICKED 3; waiting for the closes ends
        when the last connection is gone."""
        waiting = self.h.factory.wait_closed(5)
        self.h.factory.kick_all(P.KICKED_SHUTDOWN)
        self.assertEqual(self.client.received(), [P.Kicked(P.KICKED_SHUTDOWN)])
        self.assertNoResult(waiting)
        self.client.drop()
        self.successResultOf(waiting)

    def test_shutdown_wait_gives_up(self) -> None:
        """Connections that do not close within the grace time are aborted."""
        waiting = self.h.factory.wait_closed(5)
        self.h.factory.kick_all(P.KICKED_SHUTDOWN)
        self.h.reactor.advance(5)
        self.assertTrue(self.client.transport.disconnected)
        self.client.drop()  # what the abort leads to
        self.successResultOf(waiting)
