"""End to end: the real ``twistd -n im58d`` process, real sockets, the admin command."""

from __future__ import annotations

import os
import signal
import stat
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from im58d.wire import packets as P

from .e2e import ROOT, Daemon, admin, connect, environment, new_device, nonce_now, resume_for
from .test_logging import http

# [session] linger of the restart tests: long enough for a client to resume
# after the restart, short enough to see a lingering device go offline
LINGER = 5


class DaemonTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def add_users(self, daemon: Daemon, *names: str) -> Any:
        """Users NAME with password ``pw-NAME``: their uids, in order."""
        uids = []
        for name in names:
            out, err, code = yield admin(daemon.database, "user", "add", name,
                                         "--password", "pw-" + name)
            self.assertEqual(code, 0, err)
            uids.append(int(out))
        return uids

    @inlineCallbacks
    def test_login_over_a_real_socket(self) -> Any:
        """A user made with im58d-admin logs in to the running daemon as a
        new device and gets WELCOME (nothing sent from the device yet, cursor
        0), then ONLINE (no friend online); PING gets PONG; SIGTERM ends the
        daemon cleanly with KICKED 3 to the connected client."""
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        out, err, code = yield admin(
            daemon.database, "user", "add", "alice", "--password", "s3cret"
        )
        self.assertEqual((code, out.strip(), err), (0, b"1", b""))

        client = yield connect(daemon.access_port)
        client.send(P.Login("alice", "s3cret", new_device(), "e2e"), P.Ping())
        welcome = yield client.next()
        self.assertIsInstance(welcome, P.Welcome)
        self.assertEqual((welcome.uid, welcome.last_cmid, welcome.acked), (1, 0, 0))
        self.assertEqual((yield client.next()), P.Online(()))
        self.assertEqual((yield client.next()), P.Pong())

        ended = yield daemon.stop(signal.SIGTERM)
        self.assertEqual((yield client.next()), P.Kicked(P.KICKED_SHUTDOWN))
        yield client.lost
        self.assertTrue(ended.clean, daemon.output.decode())
        self.assertNotIn(b"Traceback", daemon.output)

    @inlineCallbacks
    def test_bad_login_over_a_real_socket(self) -> Any:
        """A wrong password gets ERROR 401 (read by the client before the
        close), and so does a user that does not exist."""
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        yield admin(daemon.database, "user", "add", "alice", "--password", "s3cret")
        for user, password in [("alice", "wrong"), ("nobody", "s3cret")]:
            client = yield connect(daemon.access_port)
            client.send(P.Login(user, password, new_device(), "e2e"), P.Ping(), P.Ping())
            error = yield client.next()
            self.assertEqual(error.code, 401, error)
            yield client.lost
        yield daemon.stop()

    @inlineCallbacks
    def test_login_without_a_device_id(self) -> Any:
        """A v1 LOGIN (a device name where the 16-byte device id goes) is a
        malformed packet: ERROR 400 and the connection is closed."""
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        yield self.add_users(daemon, "alice")
        client = yield connect(daemon.access_port)
        client.send(P.Login("alice", "pw-alice", "e2e"))  # type: ignore[arg-type]
        error = yield client.expect(P.Error)
        self.assertEqual(error.code, 400)
        yield client.lost
        yield daemon.stop()

    @inlineCallbacks
    def test_bad_config_stops_the_start(self) -> Any:
        """An unknown config key stops the daemon before it starts, with one line
        naming the key and no traceback."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "im58d.ini")
        with open(config, "w") as f:
            f.write("[session]\nlinger = 30\nlingr = 5\n")
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile", "", "im58d", "--config", config],
            env=environment(),
            path=directory,
        )
        self.assertNotEqual(code, 0)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("[session] lingr", lines[0])
        self.assertNotIn(b"Traceback", out + err)

    @inlineCallbacks
    def test_port_in_use_stops_the_start(self) -> Any:
        """A listener that cannot listen stops the start with one line naming it."""
        first = Daemon(self.mktemp())
        self.addCleanup(first.cleanup)
        yield first.start()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile", "", "im58d",
             "--database", os.path.join(directory, "db.sqlite"),
             "--access", f"tcp:{first.access_port}:interface=127.0.0.1",
             "--http", "tcp:0:interface=127.0.0.1"],
            env=environment(),
            path=ROOT,
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"[listen] access: cannot listen", out + err)
        self.assertNotIn(b"Traceback", out + err)
        yield first.stop()

    # v2: the database file holds every session key

    @inlineCallbacks
    def test_database_file_is_private(self) -> Any:
        """The daemon creates its database file (and SQLite's -wal and -shm
        beside it) mode 0600, even under a umask of 022; started on a
        database file that others can read (chmod 644) it refuses to start,
        with one line naming the file and saying chmod 600, and so does
        im58d-admin."""
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.cleanup)
        umask = os.umask(0o022)  # the child inherits it at the fork in start()
        try:
            started = daemon.start()
        finally:
            os.umask(umask)
        yield started
        yield self.add_users(daemon, "alice")  # the file is in use: -wal and -shm exist
        for path in [daemon.database, daemon.database + "-wal", daemon.database + "-shm"]:
            if path == daemon.database or os.path.exists(path):
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        ended = yield daemon.stop()
        self.assertTrue(ended.clean, daemon.output.decode())

        os.chmod(daemon.database, 0o644)
        daemon.start().addErrback(lambda _: None)
        ended = yield daemon.ended
        self.assertFalse(ended.clean)
        lines = daemon.output.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(daemon.database, lines[0])
        self.assertIn(f"chmod 600 {daemon.database}", lines[0])
        self.assertNotIn(b"Traceback", daemon.output)

        out, err, code = yield admin(daemon.database, "user", "list")
        self.assertNotEqual(code, 0)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn(f"chmod 600 {daemon.database}", lines[0])
        self.assertNotIn(b"alice", out)

    # v2: several devices of one user

    @inlineCallbacks
    def test_two_devices_of_one_user(self) -> Any:
        """Two devices of the receiver connected at once both get the
        message (the receiver's seq, no ``to``), the sender's second device
        gets the copy with the sender's seq and ``to``, the sending device
        gets MSG_A with that seq and no MSG_N of it.  The first ACK_R of the
        receiver's devices brings ACK_N [seqA] to both of the sender's
        devices, the second brings no other.  Around it, presence is the
        user's, not the device's: the first device signing in brings
        PRESENCE true to the friend's devices, the second none (it tells the
        user's first device CHANGED "devices"; both get ONLINE with the
        friend); BYE of the first device brings nothing, BYE of the last
        PRESENCE false."""
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        alice, bob = yield self.add_users(daemon, "alice", "bob")
        yield admin(daemon.database, "friend", "add", "alice", "bob")
        clients = yield gatherResults([connect(daemon.access_port) for _ in range(4)])
        a1, a2, b1, b2 = clients
        yield a1.login("alice", "pw-alice", device_name="phone")
        welcome, online = yield a2.login("alice", "pw-alice", device_name="tablet")
        self.assertEqual((welcome.uid, welcome.last_cmid, welcome.acked, online),
                         (alice, 0, 0, P.Online(())))
        self.assertEqual((yield a1.expect(P.Changed)).what, "devices")
        _, online = yield b1.login("bob", "pw-bob")
        self.assertEqual(online, P.Online((alice,)))
        for device in (a1, a2):
            self.assertEqual((yield device.next()), P.Presence(bob, True))
        _, online = yield b2.login("bob", "pw-bob")
        self.assertEqual(online, P.Online((alice,)))
        self.assertEqual((yield b1.expect(P.Changed)).what, "devices")
        for device in (a1, a2):
            yield device.nothing_pending()  # no PRESENCE for bob's second device

        a1.send(P.MsgR(1, bob, "你好"))
        ack = yield a1.expect(P.MsgA)
        self.assertEqual(ack.cmid, 1)
        to_bob = []
        for device in (b1, b2):
            notice = yield device.expect(P.MsgN)
            self.assertEqual((notice.msg_id, notice.sender, notice.body, notice.group,
                              notice.to), (ack.msg_id, alice, "你好", None, None))
            to_bob.append(notice)
        self.assertEqual(to_bob[0], to_bob[1])
        copy = yield a2.expect(P.MsgN)
        self.assertEqual(copy, P.MsgN(ack.seq, ack.msg_id, alice, "你好", to_bob[0].ts,
                                      None, bob))
        yield a1.nothing_pending()  # the sending device gets no MSG_N of seqA

        seq_b = to_bob[0].seq
        b1.send(P.AckR(seq_b))
        self.assertEqual((yield b1.next()), P.AckA(seq_b))
        self.assertEqual((yield a1.next()), P.AckN(ack.seq))
        self.assertEqual((yield a2.next()), P.AckN(ack.seq))
        b2.send(P.AckR(seq_b))
        self.assertEqual((yield b2.next()), P.AckA(seq_b))
        a2.send(P.AckR(ack.seq))
        self.assertEqual((yield a2.next()), P.AckA(ack.seq))
        for device in (a1, a2, b1, b2):
            yield device.nothing_pending()

        b1.send(P.Bye())
        yield b1.lost
        for device in (a1, a2):
            yield device.nothing_pending()
        b2.send(P.Bye())
        yield b2.lost
        for device in (a1, a2):
            self.assertEqual((yield device.next()), P.Presence(bob, False))
        yield daemon.stop()

    @inlineCallbacks
    def test_cmids_are_per_device(self) -> Any:
        """De-duplication is by (sender, device, cmid): a second device of
        the same user starting its cmids at 1 sends new messages; a new
        LOGIN of a device tells it its highest stored cmid in WELCOME (and
        kicks the old connection with KICKED 1); a cmid reused for another
        body gets ERROR 409 with ref = cmid and the connection stays open,
        the same body gets the same MSG_A."""
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        alice, bob = yield self.add_users(daemon, "alice", "bob")
        phone, tablet = new_device(), new_device()
        first = yield connect(daemon.access_port)
        yield first.login("alice", "pw-alice", phone)
        first.send(P.MsgR(1, bob, "one"), P.MsgR(2, bob, "two"))
        one = yield first.expect(P.MsgA)
        two = yield first.expect(P.MsgA)
        other = yield connect(daemon.access_port)
        yield other.login("alice", "pw-alice", tablet)
        self.assertEqual((yield first.expect(P.Changed)).what, "devices")
        other.send(P.MsgR(1, bob, "three"))
        three = yield other.expect(P.MsgA)
        self.assertEqual(len({one.msg_id, two.msg_id, three.msg_id}), 3)
        self.assertEqual((yield first.expect(P.MsgN)).body, "three")

        again = yield connect(daemon.access_port)
        welcome, _ = yield again.login("alice", "pw-alice", phone)
        self.assertEqual(welcome.last_cmid, 2)
        kicked = yield first.next()
        if isinstance(kicked, P.Changed):  # the device list moved; told or not, it goes
            kicked = yield first.next()
        self.assertEqual(kicked, P.Kicked(P.KICKED_REPLACED))
        yield first.lost
        self.assertEqual((yield other.expect(P.Changed)).what, "devices")
        again.send(P.MsgR(2, bob, "not two"))
        error = yield again.expect(P.Error)
        self.assertEqual((error.code, error.ref), (409, 2))
        again.send(P.MsgR(2, bob, "two"))
        self.assertEqual((yield again.next()), two)
        yield again.nothing_pending()
        yield daemon.stop()

    # v2: durable sessions

    @inlineCallbacks
    def survives_a_restart(self, sig: int) -> Any:
        """Alice's session (LOGIN, then a RESUME accepted on a second
        connection) and Carol's, both online when the daemon is stopped
        with ``sig`` and started again on the same database: Bob, their
        friend, connecting after the restart gets ONLINE listing both;
        Alice's RESUME replaying the accepted nonce gets 409, a fresh nonce
        RESUMED (no LOGIN, no ONLINE: she was online all along) and her
        token still works; Bob sees no presence change until Carol, who
        does not come back, goes offline when her linger from the restart
        ends."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "im58d.ini")
        with open(config, "w") as f:
            f.write(f"[session]\nlinger = {LINGER}\n")
        daemon = Daemon(directory, extra=["--config", config])
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        alice, bob, carol = yield self.add_users(daemon, "alice", "bob", "carol")
        for friend in ("alice", "carol"):
            yield admin(daemon.database, "friend", "add", "bob", friend)

        first = yield connect(daemon.access_port)
        welcome, _ = yield first.login("alice", "pw-alice")
        nonce = nonce_now()
        second = yield connect(daemon.access_port)
        second.send(resume_for(welcome, nonce))
        resumed = yield second.expect(P.Resumed)
        self.assertEqual(resumed.uid, alice)
        self.assertEqual((yield first.next()), P.Kicked(P.KICKED_REPLACED))
        yield first.lost
        yield second.nothing_pending()  # no ONLINE: the device was online
        lingering = yield connect(daemon.access_port)
        yield lingering.login("carol", "pw-carol")

        ended = yield daemon.restart(sig)
        if sig == signal.SIGTERM:
            self.assertTrue(ended.clean, daemon.all_output.decode())
            self.assertEqual((yield second.next()), P.Kicked(P.KICKED_SHUTDOWN))
        else:
            self.assertEqual(ended.signal, sig)
        yield second.lost
        yield lingering.lost

        friend = yield connect(daemon.access_port)
        _, online = yield friend.login("bob", "pw-bob")
        self.assertEqual(sorted(online.uids), [alice, carol])

        third = yield connect(daemon.access_port)
        third.send(resume_for(welcome, nonce))
        error = yield third.expect(P.Error)
        self.assertEqual(error.code, 409)
        third.send(resume_for(welcome, nonce_now()))
        resumed = yield third.expect(P.Resumed)
        self.assertEqual(resumed.uid, alice)
        yield third.nothing_pending()
        status, _ = yield http(daemon.http_port, "GET", "/v1/versions", token=welcome.token)
        self.assertEqual(status, 200)

        gone = yield friend.next()
        self.assertEqual(gone, P.Presence(carol, False))
        self.assertGreaterEqual(reactor.seconds() - daemon.started_at, LINGER)
        yield friend.nothing_pending()
        yield third.nothing_pending()
        ended = yield daemon.stop()
        self.assertTrue(ended.clean, daemon.output.decode())
        self.assertNotIn(b"Traceback", daemon.all_output)

    def test_sessions_survive_sigterm(self) -> Any:
        """Sessions and who is online survive a clean stop (SIGTERM): see
        ``survives_a_restart``."""
        return self.survives_a_restart(signal.SIGTERM)

    def test_sessions_survive_sigkill(self) -> Any:
        """Sessions, accepted RESUME nonces and who is online survive the
        daemon's death (SIGKILL): see ``survives_a_restart``."""
        return self.survives_a_restart(signal.SIGKILL)
