"""The access layer: LOGIN of a device, the pre-login rule, errors, heartbeat,
and a device's life on its connection (PROTOCOL.md 1.3, 1.6)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from im58d.store.accounts import make_friends_txn, set_disabled_txn
from im58d.wire import frame, varint
from im58d.wire import packets as P

from .support import DEVICE, Harness, add_user, device_id, immediate_verify


def db_dump(harness: Harness) -> list[str]:
    return list(harness.db.conn.iterdump())


def sessions_of(harness: Harness, uid: int) -> list[tuple[bytes, int]]:
    """The user's sessions in the store: (session id, online), oldest first."""
    return [(bytes(sid), online) for sid, online in harness.db.execute(
        "SELECT id, online FROM sessions WHERE uid = ? ORDER BY created, device", (uid,))]


class LoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.alice = add_user(self.h.store, "alice", "secret")

    def test_welcome_then_online(self) -> None:
        """LOGIN with good credentials gets WELCOME with the contract's ten
        fields, then ONLINE (the empty array: no friend online); the device is
        online here on this connection, found by session id and token."""
        client = self.h.connect()
        client.send(P.Login("alice", "secret", DEVICE, "Alice's phone", "app/2.0"))
        welcome, online = client.received()
        self.assertIsInstance(welcome, P.Welcome)
        self.assertEqual(welcome.uid, self.alice)
        self.assertEqual(len(welcome.session_id), 16)
        self.assertEqual(len(welcome.session_key), 32)
        self.assertTrue(welcome.token)
        # inbox_max, heartbeat_s, linger_s, iplist_version, last_cmid, acked
        self.assertEqual(welcome[4:], (0, 240, 300, 7, 0, 0))
        self.assertEqual(online, P.Online(()))
        [device] = self.h.router.user(self.alice).devices.values()
        self.assertIs(self.h.router.device_by_id(welcome.session_id), device)
        self.assertIs(self.h.router.device_by_token(welcome.token), device)
        self.assertEqual(
            (device.device_id, device.name, device.client, device.token),
            (DEVICE, "Alice's phone", "app/2.0", welcome.token),
        )
        self.assertIs(device.connection, client.protocol)
        self.assertEqual(sessions_of(self.h, self.alice), [(welcome.session_id, 1)])
        self.assertFalse(client.closed)

    def test_online_names_the_friends_online_now(self) -> None:
        """The ONLINE after WELCOME names the user's friends that are online,
        a lingering one too, not those offline, not online non-friends."""
        uids = {name: add_user(self.h.store, name) for name in ("bob", "carol", "dave", "erin")}
        for name in ("bob", "carol", "erin"):
            make_friends_txn(self.h.db, self.alice, uids[name], 0)
        self.h.connect().login("bob")
        self.h.connect().login("dave")
        erin = self.h.connect()
        erin.login("erin")
        erin.drop()
        client = self.h.connect()
        client.send(P.Login("alice", "secret", DEVICE))
        self.assertEqual(client.received()[1:], [P.Online((uids["bob"], uids["erin"]))])

    def test_device_name_and_client_are_optional(self) -> None:
        """LOGIN with only the device id signs the device in with no name; a
        name over 128 characters is cut."""
        client = self.h.connect()
        client.send(P.Login("alice", "secret", DEVICE))
        self.assertIsInstance(client.received()[0], P.Welcome)
        other = self.h.connect()
        other.send(P.Login("alice", "secret", device_id(2), "x" * 200))
        self.assertIsInstance(other.received()[0], P.Welcome)
        names = self.h.db.execute("SELECT device_id, name FROM devices ORDER BY id").fetchall()
        self.assertEqual(names, [(DEVICE, ""), (device_id(2), "x" * 128)])

    def test_device_id_required(self) -> None:
        """LOGIN without a device id (version 1's three fields with a text
        device), or with one that is not 16 bytes of bin, gets ERROR 400 and a
        close; no session is made."""
        for fields in (
            ["alice", "secret"],
            ["alice", "secret", "phone"],
            ["alice", "secret", "0123456789abcdef"],  # 16 characters, but str
            ["alice", "secret", b"short"],
            ["alice", "secret", bytes(17)],
            ["alice", "secret", None],
        ):
            client = self.h.connect()
            client.send_bytes(frame(P.LOGIN, fields))
            [error] = client.received()
            self.assertEqual(error.code, 400, fields)
            self.assertTrue(client.closed)
        self.assertEqual(sessions_of(self.h, self.alice), [])
        self.assertIsNone(self.h.router.user(self.alice))

    def test_bad_password_and_unknown_user_look_alike(self) -> None:
        """A wrong password and an unknown user get the same ERROR 401 and a close."""
        wrong = self.h.connect()
        wrong.send(P.Login("alice", "nope", DEVICE))
        unknown = self.h.connect()
        unknown.send(P.Login("mallory", "secret", DEVICE))
        answers = [wrong.received(), unknown.received()]
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(answers[0][0].code, 401)
        self.assertTrue(wrong.closed and unknown.closed)
        self.assertIsNone(self.h.router.user(self.alice))

    def test_refused_logins_are_logged(self) -> None:
        """Each refused login is one warning naming the uid (or "an unknown
        name") and the address, for fail2ban and the like; neither the typed
        name nor the password is in it."""
        with capturedLogs() as events:
            self.h.connect("192.0.2.7").send(P.Login("alice", "nope", DEVICE))
            self.h.connect("192.0.2.8").send(P.Login("hunter2", "hunter2", DEVICE))
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
            client.send(P.Login("alice", "guess", DEVICE))
            self.assertEqual(client.received()[0].code, 401)
        client = self.h.connect("10.0.1.1")
        client.send(P.Login("alice", "secret", DEVICE))
        self.assertEqual([p.code for p in client.received()], [429])
        self.assertTrue(client.closed)
        self.h.reactor.advance(901)
        self.h.connect("10.0.1.1").login("alice", "secret")

    def test_too_many_failures_from_an_address(self) -> None:
        """20 failed attempts from one address block it (429) for every name;
        other addresses are not affected."""
        for i in range(20):
            client = self.h.connect("10.9.9.9")
            client.send(P.Login(f"user{i}", "guess", DEVICE))
            self.assertEqual(client.received()[0].code, 401)
        blocked = self.h.connect("10.9.9.9")
        blocked.send(P.Login("alice", "secret", DEVICE))
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
            client.send(P.Login("alice", "guess", DEVICE))
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
            client.send(P.Login(f"user{i}", "secret", DEVICE))
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
            client.send(P.Login("alice" if i % 2 else f"x{i}", "guess", DEVICE))
        self.h.connect().send_bytes(b"\x05\x10\xc1\xc1\xc1\xc1")
        self.h.connect().send(P.MsgR(1, self.alice, "hi"))
        self.h.connect().send_bytes(frame(P.LOGIN, ["alice", "secret", "phone"]))
        self.assertEqual(db_dump(self.h), before)

    def test_disabled_account(self) -> None:
        """A disabled account with the right password gets ERROR 403; with a
        wrong one, 401 as for anyone.  No session is made."""
        set_disabled_txn(self.h.db, "alice", True)
        client = self.h.connect()
        client.send(P.Login("alice", "secret", DEVICE))
        self.assertEqual([p.code for p in client.received()], [403])
        client = self.h.connect()
        client.send(P.Login("alice", "wrong", DEVICE))
        self.assertEqual([p.code for p in client.received()], [401])
        self.assertEqual(sessions_of(self.h, self.alice), [])

    def test_packets_after_login_wait_for_welcome(self) -> None:
        """Packets pipelined behind LOGIN are handled after WELCOME and its
        ONLINE, in order."""
        client = self.h.connect()
        client.send(P.Login("alice", "secret", DEVICE), P.Ping(), P.Ping())
        packets = client.received()
        self.assertEqual([type(p) for p in packets], [P.Welcome, P.Online, P.Pong, P.Pong])

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
        client.send(P.Login("alice", "secret", DEVICE))
        client.drop()
        pending[0].callback(True)
        self.h.turn()
        self.assertIsNone(self.h.router.user(self.alice))
        self.assertEqual(len(self.h.router), 0)
        self.assertEqual(sessions_of(self.h, self.alice), [])


class DevicesTests(SynchronousTestCase):
    """Several devices of one user, each with its own session (PROTOCOL.md 1.3)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.alice = add_user(self.h.store, "alice")

    def test_two_devices_online_at_once(self) -> None:
        """Two devices of one user are online at once, each with its own
        session and connection; neither is kicked; each answers on its own."""
        phone = self.h.connect()
        phone_welcome = phone.login("alice", device=device_id(1))
        tablet = self.h.connect()
        tablet_welcome = tablet.login("alice", device=device_id(2))
        self.assertNotEqual(phone_welcome.session_id, tablet_welcome.session_id)
        self.assertNotEqual(phone_welcome.token, tablet_welcome.token)
        devices = self.h.router.user(self.alice).devices
        self.assertEqual(set(devices), {phone_welcome.session_id, tablet_welcome.session_id})
        self.assertIs(devices[phone_welcome.session_id].connection, phone.protocol)
        self.assertIs(devices[tablet_welcome.session_id].connection, tablet.protocol)
        # the first device hears that the device list moved, and nothing else
        self.assertEqual([type(p) for p in phone.received()], [P.Changed])
        self.assertFalse(phone.closed or tablet.closed)
        phone.send(P.Ping())
        tablet.send(P.Ping())
        self.assertEqual((phone.received(), tablet.received()), ([P.Pong()], [P.Pong()]))

    def test_new_login_of_the_same_device_kicks_the_old(self) -> None:
        """A new LOGIN of the same device replaces its session: the old
        connection gets KICKED 1 (its last packet) and is closed; its session
        is gone, the new one is the device's only one."""
        first = self.h.connect()
        old = first.login("alice")
        second = self.h.connect()
        welcome = second.login("alice")
        packets = first.received()
        self.assertEqual(packets[-1], P.Kicked(P.KICKED_REPLACED))
        self.assertTrue(first.closed)
        self.assertIsNone(self.h.router.device_by_id(old.session_id))
        device = self.h.device_of(self.alice)
        self.assertEqual(device.token, welcome.token)
        self.assertEqual(sessions_of(self.h, self.alice), [(welcome.session_id, 1)])
        first.drop()  # the close arrives: nothing changes
        self.assertIs(self.h.device_of(self.alice), device)
        self.assertIs(device.connection, second.protocol)
        self.assertEqual(second.received(), [])

    def test_login_of_another_device_kicks_nobody(self) -> None:
        """KICKED 1 is for the same device only: another device's LOGIN leaves
        the first connected, even a third and a fourth."""
        first = self.h.connect()
        first.login("alice", device=device_id(1))
        for n in (2, 3, 4):
            self.h.connect().login("alice", device=device_id(n))
        self.assertNotIn(P.Kicked(P.KICKED_REPLACED), first.received())
        self.assertFalse(first.closed)
        self.assertEqual(len(self.h.router.user(self.alice).devices), 4)

    def test_eviction_past_max_devices(self) -> None:
        """With max_devices = 2, a third device's LOGIN ends the least
        recently active session: KICKED 5 on that device's connection (its last
        packet), which closes; its RESUME answers 409 from then on.  The
        others stay."""
        h = Harness(max_devices=2)
        add_user(h.store, "alice")
        clients, welcomes = [], []
        for n in (1, 2, 3):
            client = h.connect()
            welcomes.append(client.login("alice", device=device_id(n)))
            clients.append(client)
            h.reactor.advance(10)
        self.assertEqual(clients[0].received()[-1], P.Kicked(P.KICKED_SIGNED_OUT))
        self.assertTrue(clients[0].closed)
        self.assertNotIn(P.Kicked(P.KICKED_SIGNED_OUT), clients[1].received())
        self.assertFalse(clients[1].closed or clients[2].closed)
        self.assertEqual(
            set(h.router.user(self.alice).devices),
            {welcomes[1].session_id, welcomes[2].session_id},
        )
        self.assertEqual([code for code, in h.db.execute(
            "SELECT count(*) FROM sessions")], [2])
        clients[0].drop()
        self.assertEqual([p.code for p in h.connect().resume(welcomes[0])], [409])

    def test_an_offline_device_is_evicted_before_an_online_one(self) -> None:
        """A device online now counts as active now: past max_devices the
        offline device goes, though it was active more recently than the
        online one signed in."""
        h = Harness(max_devices=2)
        add_user(h.store, "alice")
        online = h.connect()
        online.login("alice", device=device_id(1))
        h.reactor.advance(10)
        gone = h.connect()
        gone_welcome = gone.login("alice", device=device_id(2))
        h.reactor.advance(10)
        gone.send(P.Bye())
        h.reactor.advance(10)
        h.connect().login("alice", device=device_id(3))
        self.assertFalse(online.closed)
        self.assertNotIn(P.Kicked(P.KICKED_SIGNED_OUT), online.received())
        self.assertEqual([p.code for p in h.connect().resume(gone_welcome)], [409])


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
        self.assertFalse(client.closed)
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
        """A server-to-client packet type sent by a client is a 400, ONLINE
        included."""
        self.client.send(P.Pong())
        self.assertEqual([p.code for p in self.client.received()], [400])
        self.assertTrue(self.client.closed)
        other = self.h.connect()
        other.login("alice", "secret", device=device_id(2))
        other.send(P.Online((1,)))
        self.assertEqual([p.code for p in other.received()], [400])
        self.assertTrue(other.closed)

    def test_login_twice(self) -> None:
        """LOGIN on a logged-in connection is a 400."""
        self.client.send(P.Login("alice", "secret", DEVICE))
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
        self.welcome = self.client.login("alice", "secret")

    def test_bye(self) -> None:
        """BYE takes the device offline at once and closes the connection; the
        session stays in the store (offline), and RESUME works afterwards."""
        self.client.send(P.Bye())
        self.assertTrue(self.client.closed)
        self.assertIsNone(self.h.router.user(self.alice))
        self.assertIsNone(self.h.router.device_by_id(self.welcome.session_id))
        self.assertEqual(sessions_of(self.h, self.alice), [(self.welcome.session_id, 0)])
        again = self.h.connect()
        self.assertIsInstance(again.resume(self.welcome)[0], P.Resumed)
        self.assertEqual(sessions_of(self.h, self.alice), [(self.welcome.session_id, 1)])

    def test_drop_lingers(self) -> None:
        """A drop without BYE keeps the device online for linger seconds, then
        takes it offline; its session stays (RESUME works afterwards)."""
        device = self.h.device_of(self.alice)
        self.client.drop()
        self.assertIs(self.h.device_of(self.alice), device)
        self.assertIsNone(device.connection)
        self.h.reactor.advance(299)
        self.assertIs(self.h.device_of(self.alice), device)
        self.assertEqual(sessions_of(self.h, self.alice), [(self.welcome.session_id, 1)])
        self.h.reactor.advance(1)
        self.assertIsNone(self.h.device_of(self.alice))
        self.assertEqual(sessions_of(self.h, self.alice), [(self.welcome.session_id, 0)])
        again = self.h.connect()
        self.assertIsInstance(again.resume(self.welcome)[0], P.Resumed)

    def test_heartbeat_keeps_connection(self) -> None:
        """A client that pings every heartbeat_s stays connected."""
        for _ in range(5):
            self.h.reactor.advance(240)
            self.client.send(P.Ping())
            self.h.factory.sweep()
        self.assertFalse(self.client.closed)

    def test_silent_connection_closed(self) -> None:
        """A connection silent for 2 × heartbeat + 30 s is closed; its device lingers."""
        self.h.reactor.advance(2 * 240 + 30)
        self.h.factory.sweep()
        self.assertFalse(self.client.closed)
        self.h.reactor.advance(1)
        self.h.factory.sweep()
        self.assertTrue(self.client.transport.disconnected)
        self.client.drop()
        device = self.h.device_of(self.alice)
        self.assertIsNotNone(device)
        self.assertIsNone(device.connection)

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
        client.send(P.Login("alice", "secret", device_id(2)), *[P.Ping()] * 32)
        self.assertEqual(client.transport.producerState, "paused")
        self.assertFalse(client.closed)
        client.send(P.Ping())
        self.assertEqual([p.code for p in client.received()], [400])
        self.assertTrue(client.closed)

    def test_client_that_does_not_read_is_dropped(self) -> None:
        """A client that leaves the server's writes unread (its buffer stays
        full) for a minute is dropped; its device lingers."""
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
        """Disabling a user with devices online ends their sessions with
        KICKED 4 on every connection at the next housekeeping round; a
        lingering device goes too, and RESUME is refused."""
        other = self.h.connect()
        other_welcome = other.login("alice", "secret", device=device_id(2))
        other.drop()
        self.client.received()
        set_disabled_txn(self.h.db, "alice", True)
        self.h.sessions.end_disabled()
        self.h.turn()
        self.assertEqual(self.client.received(), [P.Kicked(P.KICKED_DISABLED)])
        self.assertTrue(self.client.closed)
        self.assertIsNone(self.h.router.user(self.alice))
        for welcome in (self.welcome, other_welcome):
            self.assertEqual([p.code for p in self.h.connect().resume(welcome)], [409])

    def test_shutdown_kicks(self) -> None:
        """On shutdown every client gets KICKED 3; waiting for the closes ends
        when the last connection is gone.  The device stays online in the
        store (it lingers again after the restart)."""
        waiting = self.h.factory.wait_closed(5)
        self.h.factory.kick_all(P.KICKED_SHUTDOWN)
        self.assertEqual(self.client.received(), [P.Kicked(P.KICKED_SHUTDOWN)])
        self.assertNoResult(waiting)
        self.client.drop()
        self.successResultOf(waiting)
        self.assertEqual(sessions_of(self.h, self.alice), [(self.welcome.session_id, 1)])

    def test_shutdown_wait_gives_up(self) -> None:
        """Connections that do not close within the grace time are aborted."""
        waiting = self.h.factory.wait_closed(5)
        self.h.factory.kick_all(P.KICKED_SHUTDOWN)
        self.h.reactor.advance(5)
        self.assertTrue(self.client.transport.disconnected)
        self.client.drop()  # what the abort leads to
        self.successResultOf(waiting)
