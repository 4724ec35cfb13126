"""systemd: readiness notification, socket activation and its plaintext rule,
and the unit files (``etc/im58d.service``, ``etc/im58d.socket``)."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactor
from twisted.scripts.twistd import ServerOptions  # type: ignore[attr-defined]
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from im58d import tap
from im58d.endpoints import inherited_socket, plaintext_exposed, server_endpoint
from im58d.systemd import NotifyService, notify, notify_address
from im58d.wire import packets as P

from .e2e import ROOT, TIMEOUT, Daemon, admin, connect, environment
from .test_logging import http

UNIT = os.path.join(ROOT, "etc", "im58d.service")
SOCKET_UNIT = os.path.join(ROOT, "etc", "im58d.socket")


def receiver(test: SynchronousTestCase, address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    test.addCleanup(sock.close)
    sock.bind(address)
    sock.settimeout(0)
    return sock


class NotifyTests(SynchronousTestCase):
    def test_addresses(self) -> None:
        """``$NOTIFY_SOCKET`` is a path, or ``@name`` for the abstract
        namespace (a leading NUL); anything else, or nothing, is no manager."""
        cases = {"/run/systemd/notify": "/run/systemd/notify", "@abc": "\0abc",
                 "": None, "@": None, "vsock:2:1234": None, "relative": None}
        self.assertEqual({k: notify_address({"NOTIFY_SOCKET": k}) for k in cases}, cases)
        self.assertIsNone(notify_address({}))

    def test_path(self) -> None:
        """The state goes as one datagram to a socket named by path."""
        directory = tempfile.mkdtemp(prefix="im58d-")  # short: sun_path is 108 bytes
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "notify")
        sock = receiver(self, path)
        self.assertTrue(notify("READY=1", {"NOTIFY_SOCKET": path}))
        self.assertEqual(sock.recv(100), b"READY=1")

    def test_abstract(self) -> None:
        """``@name`` reaches a socket in the abstract namespace."""
        name = f"im58d-test-{secrets.token_hex(8)}"
        sock = receiver(self, "\0" + name)
        self.assertTrue(notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(sock.recv(100), b"STOPPING=1")

    def test_no_manager(self) -> None:
        """Without a manager, or when it is gone, nothing is sent and nothing
        raised: the daemon runs on."""
        self.assertFalse(notify("READY=1", {}))
        gone = {"NOTIFY_SOCKET": f"@im58d-test-{secrets.token_hex(8)}"}
        self.assertFalse(notify("READY=1", gone))


class NotifyServiceTests(SynchronousTestCase):
    def test_ready_then_stopping(self) -> None:
        """READY=1 goes once the reactor runs (after every service has
        started), not before; STOPPING=1 when the service stops."""
        sent: list[str] = []
        clock = MemoryReactor()

        def send(state: str) -> bool:
            sent.append(state)
            return True

        service = NotifyService(clock, send)
        service.startService()
        self.assertEqual(sent, [])
        clock.run()
        self.assertEqual([s.splitlines()[0] for s in sent], ["READY=1"])
        service.stopService()
        self.assertEqual([s.splitlines()[0] for s in sent], ["READY=1", "STOPPING=1"])

    def test_last_in_the_tree(self) -> None:
        """The daemon's tree starts the notifier last (after the listeners)
        and so, stopping in reverse, stops it first."""
        options = tap.Options()
        options.parseOptions(["--database", self.mktemp()])
        top = tap.makeService(options, reactor=MemoryReactor())
        children = list(top)  # type: ignore[call-overload]
        self.assertIsInstance(children[-1], NotifyService)
        self.assertIsInstance(children[-2], tap.ListenerService)


class InheritedSocketTests(SynchronousTestCase):
    def listening(self, family: int, address: Any) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(address)
        sock.listen()
        return sock

    def test_exposure_by_address(self) -> None:
        """A systemd: listener is judged by the address systemd bound: loopback
        and Unix sockets are local, any other address (or every one) is
        exposed, and so is one whose address is not known."""
        description = "systemd:domain=INET:index=0"
        local = [(socket.AF_INET, ("127.0.0.1", 5858)), (socket.AF_INET6, ("::1", 5858, 0, 0)),
                 (socket.AF_INET6, ("::ffff:127.0.0.1", 5858, 0, 0)),
                 (socket.AF_UNIX, "/run/im58d.sock")]
        exposed = [(socket.AF_INET, ("0.0.0.0", 5858)), (socket.AF_INET, ("10.0.0.5", 5858)),
                   (socket.AF_INET6, ("::", 5858, 0, 0)),
                   (socket.AF_INET6, ("fe80::1%eth0", 5858, 0, 2))]
        self.assertEqual([plaintext_exposed(description, a) for a in local], [False] * 4)
        self.assertEqual([plaintext_exposed(description, a) for a in exposed], [True] * 4)
        self.assertTrue(plaintext_exposed(description))

    def test_reads_the_socket(self) -> None:
        """The address is read from the descriptor itself."""
        sock = self.listening(socket.AF_INET, ("127.0.0.1", 0))
        endpoint = AdoptedStreamServerEndpoint(MemoryReactor(), sock.fileno(), socket.AF_INET)
        self.assertEqual(inherited_socket(endpoint), (socket.AF_INET, sock.getsockname()))
        self.assertIsNone(inherited_socket(object()))

    def test_wrong_domain(self) -> None:
        """A socket of another family than domain= says which to write."""
        directory = tempfile.mkdtemp(prefix="im58d-")
        self.addCleanup(shutil.rmtree, directory)
        sock = self.listening(socket.AF_UNIX, os.path.join(directory, "s"))
        endpoint = AdoptedStreamServerEndpoint(MemoryReactor(), sock.fileno(), socket.AF_INET)
        error = self.assertRaises(ValueError, inherited_socket, endpoint)
        self.assertIn("say domain=UNIX", str(error))

    def test_not_a_socket(self) -> None:
        """A descriptor that is no socket is an error naming it."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        endpoint = AdoptedStreamServerEndpoint(MemoryReactor(), read, socket.AF_INET)
        error = self.assertRaises(ValueError, inherited_socket, endpoint)
        self.assertIn(f"descriptor {read}", str(error))

    def test_no_such_socket(self) -> None:
        """Outside socket activation a systemd: listener fails with a line
        that says what is missing."""
        error = self.assertRaises(ValueError, server_endpoint, MemoryReactor(),
                                  "systemd:domain=INET:index=0")
        self.assertIn("systemd handed over no such socket", str(error))


class ActivatedDaemon(Daemon):
    """The daemon as systemd starts it: listening sockets as descriptors 3
    and up (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID) and ``$NOTIFY_SOCKET``."""

    def __init__(self, directory: str, sockets: Sequence[socket.socket], notify: str,
                 extra: Sequence[str] = ()) -> None:
        super().__init__(directory, extra)
        self.sockets = sockets
        self.notify = notify

    def start(self, args: Sequence[str] | None = None) -> Deferred[Daemon]:
        os.makedirs(self.directory, exist_ok=True)
        self.ready = Deferred()
        self.ended = Deferred()
        env = environment()
        env.update(LISTEN_FDS=str(len(self.sockets)),
                   LISTEN_FDNAMES=":".join(["im58d.socket"] * len(self.sockets)),
                   NOTIFY_SOCKET=self.notify)
        boot = ("import os; os.environ['LISTEN_PID'] = str(os.getpid()); "
                "from twisted.scripts.twistd import run; run()")
        argv = [sys.executable, "-c", boot, "-n", "--pidfile", "", "im58d",
                "--database", self.database, *self.extra]
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        fds.update({3 + i: s.fileno() for i, s in enumerate(self.sockets)})
        reactor.spawnProcess(self, sys.executable, argv, env=env, path=self.directory,
                             childFDs=fds)
        self.running = True
        self.ready.addTimeout(TIMEOUT, reactor)
        return self.ready


class Notifications(DatagramProtocol):
    def __init__(self) -> None:
        self.states: DeferredQueue[bytes] = DeferredQueue()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.states.put(datagram)

    def next(self) -> Deferred[bytes]:
        d = self.states.get()
        d.addTimeout(TIMEOUT, reactor)
        return d


class SocketActivationTests(TestCase):
    timeout = 60

    def socket(self, host: str) -> socket.socket:
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.listen()
        return sock

    def notifications(self) -> tuple[str, Notifications]:
        name = f"im58d-test-{secrets.token_hex(8)}"
        protocol = Notifications()
        port = reactor.listenUNIXDatagram("\0" + name, protocol)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return "@" + name, protocol

    @inlineCallbacks
    def test_sockets_from_systemd(self) -> Any:
        """Started as systemd would start it (etc/im58d.socket), the daemon
        serves on the sockets it is handed (loopback, so no consent needed),
        says READY=1 to $NOTIFY_SOCKET (an abstract name) once they are up,
        and STOPPING=1 on SIGTERM before it ends cleanly."""
        access, web = self.socket("127.0.0.1"), self.socket("127.0.0.1")
        address, notifications = self.notifications()
        daemon = ActivatedDaemon(self.mktemp(), [access, web], address, extra=[
            "--access", "systemd:domain=INET:index=0", "--http", "systemd:domain=INET:index=1",
        ])
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        self.assertEqual((daemon.access_port, daemon.http_port),
                         (access.getsockname()[1], web.getsockname()[1]))
        ready = yield notifications.next()
        self.assertEqual(ready.splitlines()[0], b"READY=1")
        access.close()  # the daemon has its own; ours must not take connections
        web.close()

        yield admin(daemon.database, "user", "add", "alice", "--password", "s3cret")
        client = yield connect(daemon.access_port)
        welcome, online = yield client.login("alice", "s3cret")
        self.assertEqual((welcome.uid, online), (1, P.Online(())))
        status, _ = yield http(daemon.http_port, "GET", "/v1/iplist")
        self.assertEqual(status, 200)

        ended = yield daemon.stop(signal.SIGTERM)
        stopping = yield notifications.next()
        self.assertEqual(stopping.splitlines()[0], b"STOPPING=1")
        self.assertTrue(ended.clean, daemon.output.decode())

    @inlineCallbacks
    def test_exposed_socket_refused(self) -> Any:
        """A socket systemd bound to every address carries plain text to
        other machines: the daemon refuses it with one line naming the key,
        and never says READY=1."""
        address, notifications = self.notifications()
        daemon = ActivatedDaemon(self.mktemp(), [self.socket("0.0.0.0")], address, extra=[
            "--access", "systemd:domain=INET:index=0", "--http", "tcp:0:interface=127.0.0.1",
        ])
        self.addCleanup(daemon.cleanup)
        daemon.start().addErrback(lambda _: None)
        ended = yield daemon.ended
        self.assertFalse(ended.clean)
        lines = daemon.output.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("[listen] access: 'systemd:domain=INET:index=0' would take "
                      "unencrypted connections", lines[0])
        self.assertEqual(notifications.states.pending, [])


def unit_lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


class UnitFileTests(SynchronousTestCase):
    def test_verify(self) -> None:
        """``systemd-analyze verify`` accepts the service and socket units.
        It wants ExecStart's program to exist: where /opt/im58d/bin/twistd
        is not installed, the copy verified names this Python's twistd
        instead, every other line as shipped."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        shipped = "/opt/im58d/bin/twistd"
        twistd = shipped
        if not os.access(shipped, os.X_OK):
            twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
            if not os.access(twistd, os.X_OK):
                raise SkipTest("no twistd program to stand for " + shipped)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(UNIT) as f:
            text = f.read()
        self.assertIn(f"ExecStart={shipped} ", text)
        with open(os.path.join(directory, "im58d.service"), "w") as f:
            f.write(text.replace(f"ExecStart={shipped} ", f"ExecStart={twistd} "))
        shutil.copy(SOCKET_UNIT, directory)
        result = subprocess.run(
            [analyze, "verify", "im58d.service", "im58d.socket"], cwd=directory,
            capture_output=True, text=True, timeout=60,
        )
        ours = [line for line in (result.stderr + result.stdout).splitlines()
                if "im58d.service" in line or "im58d.socket" in line]  # not the host's
        self.assertEqual((result.returncode, ours), (0, []), result.stderr)

    def test_command_line(self) -> None:
        """ExecStart is a command line twistd takes: in the foreground, no
        pid file, the im58d plugin with the config of /etc/im58d."""
        [exec_start] = [line for line in unit_lines(UNIT) if line.startswith("ExecStart=")]
        argv = shlex.split(exec_start.removeprefix("ExecStart="))
        self.assertEqual(argv[argv.index("--config") + 1], "/etc/im58d/im58d.ini")
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f"[store]\ndatabase = {os.path.abspath(self.mktemp())}\n")
        argv[argv.index("--config") + 1] = config
        options = ServerOptions()
        options.parseOptions(argv[1:])
        self.assertEqual((options["nodaemon"], options["pidfile"], options.subCommand),
                         (True, "", "im58d"))

    def test_choices(self) -> None:
        """The unit's choices: readiness by notification, a fixed user, the
        database in the state directory, restarts on failure, no
        capabilities, AF_UNIX allowed (the notify socket), and no
        MemoryDenyWriteExecute (pyOpenSSL's callbacks need W+X memory)."""
        lines = unit_lines(UNIT)
        for line in ["Type=notify", "User=im58d", "StateDirectory=im58d",
                     "WorkingDirectory=/var/lib/im58d", "Restart=on-failure",
                     "CapabilityBoundingSet=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                     "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                     "SystemCallFilter=@system-service"]:
            self.assertIn(line, lines)
        self.assertFalse([line for line in lines if line.startswith("MemoryDenyWriteExecute")])
        self.assertEqual([line for line in unit_lines(SOCKET_UNIT)
                          if line.startswith("ListenStream=")],
                         ["ListenStream=127.0.0.1:5858", "ListenStream=127.0.0.1:8058"])
