"""TLS listeners, the plaintext rule, and im58d-admin's trial certificate."""

from __future__ import annotations

import io
import os
import socket
import ssl
import stat
import sys
from typing import Any

from cryptography import x509
from twisted.internet import ssl as tssl
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from im58d import admin, tap
from im58d.endpoints import parse, plaintext_exposed, server_endpoint
from im58d.wire import Decoder, encode
from im58d.wire import packets as P

from .e2e import Daemon, new_device, resume_for
from .e2e import admin as admin_command


def make_cert(test: SynchronousTestCase, *hosts: str) -> tuple[str, str]:
    """key.pem and cert.pem made by ``im58d-admin cert`` in a temp folder."""
    out = test.mktemp()
    test.patch(sys, "stdout", io.StringIO())
    args = ["cert", "--out", out]
    for host in hosts:
        args += ["--host", host]
    test.assertEqual(admin.main(args), 0)
    return os.path.join(out, "key.pem"), os.path.join(out, "cert.pem")


class CertificateTests(SynchronousTestCase):
    def test_trial_certificate(self) -> None:
        """im58d-admin cert writes a private key only its owner can read and a
        self-signed certificate naming every host, names and addresses."""
        key, cert = make_cert(self, "im.example", "127.0.0.1", "::1")
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        with open(cert, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(names.value.get_values_for_type(x509.DNSName), ["im.example"])
        self.assertEqual(
            [str(a) for a in names.value.get_values_for_type(x509.IPAddress)],
            ["127.0.0.1", "::1"],
        )
        self.assertEqual(certificate.issuer, certificate.subject)

    def test_needs_a_host(self) -> None:
        """Without --host the command is refused in one line."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit):
            admin.main(["cert"])
        self.assertEqual(len(stderr.getvalue().strip().splitlines()), 1)


class EndpointTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """Endpoint strings split into kind, positional and keyword parts;
        an escaped colon stays in its value."""
        self.assertEqual(
            parse("tcp:5858:interface=\\:\\:1"), ("tcp", ["5858"], {"interface": "::1"})
        )

    def test_ssl_with_session_tickets(self) -> None:
        """An ssl: listener is built with TLS session tickets on."""
        key, cert = make_cert(self, "127.0.0.1")
        endpoint = server_endpoint(
            MemoryReactor(), f"ssl:5859:privateKey={key}:certKey={cert}:interface=127.0.0.1"
        )
        self.assertIsInstance(endpoint, SSL4ServerEndpoint)
        options = endpoint._sslContextFactory
        self.assertIsInstance(options, tssl.CertificateOptions)
        self.assertTrue(options.enableSessionTickets)

    def test_missing_certificate(self) -> None:
        """A certificate file that is not there is an error at build time."""
        self.assertRaises(
            OSError, server_endpoint, MemoryReactor(), "ssl:5859:privateKey=/nonexistent.pem"
        )

    def test_exposure(self) -> None:
        """Plain TCP on a loopback address is local; on any other address, on
        every address, or handed over by systemd it is exposed; TLS never is."""
        local = ["tcp:5858:interface=127.0.0.1", "tcp:5858:interface=\\:\\:1",
                 "tcp:5858:interface=localhost", "unix:/run/im58d.sock",
                 "ssl:5859:privateKey=k.pem:interface=0.0.0.0"]
        exposed = ["tcp:5858", "tcp:5858:interface=0.0.0.0", "tcp:5858:interface=10.0.0.5",
                   "systemd:domain=INET:index=0"]
        self.assertEqual([plaintext_exposed(d) for d in local], [False] * len(local))
        self.assertEqual([plaintext_exposed(d) for d in exposed], [True] * len(exposed))


class PlaintextRuleTests(SynchronousTestCase):
    def options(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--database", os.path.join(self.mktemp() + ".sqlite"), *argv])
        return options

    def test_refused_without_consent(self) -> None:
        """Plain TCP on a public address stops the start with one line naming
        the key; the HTTP listener is held to the same rule."""
        for key in ("access", "http"):
            options = self.options(f"--{key}", "tcp:0:interface=0.0.0.0")
            with self.assertRaises(SystemExit) as caught:
                tap.makeService(options, reactor=MemoryReactor())
            message = str(caught.exception.code)
            self.assertIn(f"[listen] {key}", message)
            self.assertNotIn("\n", message)

    def test_allowed_when_the_config_says_so(self) -> None:
        """[listen] allow_plaintext = yes lets plain TCP listen anywhere."""
        config = self.mktemp()
        with open(config, "w") as f:
            f.write("[listen]\nallow_plaintext = yes\n")
        options = self.options("--config", config, "--access", "tcp:0:interface=0.0.0.0")
        tap.makeService(options, reactor=MemoryReactor())


class TLSDaemonTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_tls_and_session_resumption(self) -> Any:
        """The daemon speaks TLS on an ssl: listener with a certificate from
        im58d-admin; a client that verifies it by address logs in (WELCOME,
        then ONLINE), and on its next connection resumes the TLS session
        instead of a full handshake, and its im58d session with RESUME."""
        key, cert = make_cert(self, "127.0.0.1")
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        number = port.getsockname()[1]
        port.close()
        daemon = Daemon(self.mktemp(), extra=[
            "--access", f"ssl:{number}:privateKey={os.path.abspath(key)}:"
                        f"certKey={os.path.abspath(cert)}:interface=127.0.0.1",
        ])
        self.addCleanup(daemon.cleanup)
        yield daemon.start(args=[
            "--database", daemon.database, "--http", "tcp:0:interface=127.0.0.1",
            "--access", "tcp:0:interface=127.0.0.1",
        ])
        out, err, code = yield admin_command(daemon.database, "user", "add", "alice",
                                             "--password", "s3cret")
        self.assertEqual(code, 0, err)

        def exchange(tls: ssl.SSLSocket, packet: Any, n: int) -> list[Any]:
            tls.sendall(encode(packet))
            decoder, received = Decoder(), list[Any]()
            while len(received) < n:
                data = tls.recv(4096)
                self.assertTrue(data, f"closed after {received}")
                received += decoder.feed(data)
            return received

        def two_connections() -> tuple[bool, bool, str, list[Any], list[Any]]:
            context = ssl.create_default_context(cafile=cert)
            reused: list[bool] = []
            session = None
            answers: list[list[Any]] = []
            for _ in range(2):
                raw = socket.create_connection(("127.0.0.1", number), timeout=10)
                with context.wrap_socket(raw, server_hostname="127.0.0.1",
                                         session=session) as tls:
                    if not answers:
                        answers.append(exchange(tls, P.Login("alice", "s3cret", new_device()), 2))
                    else:
                        answers.append(exchange(tls, resume_for(answers[0][0]), 1))
                    reused.append(bool(tls.session_reused))
                    session = tls.session
                    version = tls.version() or ""
            return reused[0], reused[1], version, answers[0], answers[1]

        first, second, version, login, resume = yield deferToThread(two_connections)
        self.assertEqual((first, second), (False, True))
        self.assertEqual(version, "TLSv1.3")
        self.assertEqual([type(p) for p in login], [P.Welcome, P.Online])
        self.assertEqual(resume, [P.Resumed(1, login[0].inbox_max, login[0].iplist_version, 0)])
        yield daemon.stop()
