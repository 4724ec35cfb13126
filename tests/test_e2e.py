"""End to end: the real ``twistd -n im58d`` process, real sockets, the admin command."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from im58d.wire import packets as P

from .e2e import ROOT, Daemon, admin, connect, environment


class DaemonTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_login_over_a_real_socket(self) -> Any:
        """A user made with im58d-admin logs in to the running daemon and gets
        WELCOME; PING gets PONG; SIGTERM ends the daemon cleanly with KICKED 3
        to the connected client."""
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        out, err, code = yield admin(
            daemon.database, "user", "add", "alice", "--password", "s3cret"
        )
        self.assertEqual((code, out.strip(), err), (0, b"1", b""))

        client = yield connect(daemon.access_port)
        client.send(P.Login("alice", "s3cret", "e2e"), P.Ping())
        welcome = yield client.next()
        self.assertIsInstance(welcome, P.Welcome)
        self.assertEqual(welcome.uid, 1)
        self.assertEqual((yield client.next()), P.Pong())

        ended = yield daemon.stop(signal.SIGTERM)
        self.assertEqual((yield client.next()), P.Kicked(P.KICKED_SHUTDOWN))
        yield client.lost
        self.assertTrue(ended.clean, daemon.output.decode())
        self.assertNotIn(b"Traceback", daemon.output)

    @inlineCallbacks
    def test_bad_login_over_a_real_socket(self) -> Any:
        """A wrong password gets ERROR 401 (read by the client before the close)."""
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        yield admin(daemon.database, "user", "add", "alice", "--password", "s3cret")
        client = yield connect(daemon.access_port)
        client.send(P.Login("alice", "wrong", "e2e"), P.Ping(), P.Ping())
        error = yield client.next()
        self.assertEqual(error.code, 401)
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
