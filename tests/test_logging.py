"""The log: one line per event, text or JSON, twistd using it, no secret in it."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions  # type: ignore[attr-defined]
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

import im58d.logging as imlog
from im58d.wire import packets as P

from .e2e import TIMEOUT, Daemon, admin, connect, new_device, nonce_now, resume_for


@implementer(ILogObserver)
class Captured(list[dict[str, Any]]):
    def __call__(self, event: dict[str, Any]) -> None:
        self.append(event)


def event(log_format: str, **fields: Any) -> dict[str, Any]:
    """A log event as twisted.logger.Logger makes it, fixed in time."""
    captured = Captured()
    Logger(namespace="im58d.test", observer=captured).info(log_format, **fields)
    captured[0]["log_time"] = 1_800_000_000.25
    return captured[0]


def failure_event() -> dict[str, Any]:
    captured = Captured()
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        Logger(namespace="im58d.test", observer=captured).failure(
            "handling {what}", what="a packet"
        )
    return captured[0]


class TextFormatTests(SynchronousTestCase):
    def test_one_line_like_twistd(self) -> None:
        """A text line is twistd's ``TIME [namespace#level] MESSAGE`` and one
        line, however many lines the message has."""
        line = imlog.format_text(event("device {device!r}\nfrom {address}",
                                       device="a\nb", address="10.0.0.1"))
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertIn(" [im58d.test#info] device 'a\\nb'\\nfrom 10.0.0.1", line)

    def test_traceback_folded(self) -> None:
        """A failure's traceback follows the message on the same line, its
        line breaks escaped; no control character survives."""
        line = imlog.format_text(failure_event())
        self.assertEqual(line.count("\n"), 1)
        self.assertIn("handling a packet\\nTraceback (most recent call last):\\n", line)
        self.assertIn("ValueError: first line\\nsecond line", line)
        self.assertEqual(imlog.one_line("a\rb\x00c\td\x7f"), "a\\rb\\x00c\td\\x7f")


class JSONFormatTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """A JSON line is one object: time (UTC), level, namespace, the
        formatted text, and the plain values the message shows."""
        line = imlog.format_json(event("login uid={uid} from {address}", uid=7,
                                       address="10.0.0.1"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(json.loads(line), {
            "time": "2027-01-15T08:00:00.250Z", "level": "info", "namespace": "im58d.test",
            "text": "login uid=7 from 10.0.0.1", "uid": 7, "address": "10.0.0.1",
        })
        # the level is twisted.logger's name for it
        self.assertIs(LogLevel.levelWithName(json.loads(line)["level"]), LogLevel.info)

    def test_only_shown_fields(self) -> None:
        """Fields the message does not show stay out, and so do objects: a
        value passed to a log call by mistake is not published as JSON."""
        record = json.loads(imlog.format_json(event(
            "session of uid={uid} from {conn}", uid=1, conn=object(), password="pw",
            time="not the time",
        )))
        self.assertNotIn("password", record)
        self.assertNotIn("conn", record)
        self.assertEqual(record["time"], "2027-01-15T08:00:00.250Z")

    def test_failure(self) -> None:
        """A failure's traceback is a field of its own, on the same line."""
        line = imlog.format_json(failure_event())
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual((record["level"], record["text"]), ("critical", "handling a packet"))
        self.assertIn("ValueError: first line\nsecond line", record["traceback"])

    def test_odd_values(self) -> None:
        """Non-ASCII text is escaped, a non-finite number is a string: the line
        is ASCII and valid JSON whatever the event holds."""
        line = imlog.format_json(event("{nick} {ratio}", nick="张三", ratio=float("nan")))
        self.assertTrue(line.isascii())
        self.assertEqual(json.loads(line)["nick"], "张三")
        self.assertEqual(json.loads(line)["ratio"], "nan")


class ObserverTests(SynchronousTestCase):
    def test_writes_and_flushes(self) -> None:
        """Each event is written as one line at once."""
        out = io.StringIO()
        observer = imlog.observer("json", out)
        observer(event("one"))
        observer(event("two"))
        self.assertEqual([json.loads(line)["text"] for line in out.getvalue().splitlines()],
                         ["one", "two"])

    def test_unencodable(self) -> None:
        """A character the file's encoding lacks is escaped rather than making
        the observer fail."""
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="ascii")
        imlog.observer("text", out)(event("nick {nick}", nick="张三"))
        self.assertIn(b"nick \\u5f20\\u4e09", raw.getvalue())


class TwistdTests(SynchronousTestCase):
    def config(self, log_format: str) -> str:
        path: str = self.mktemp()
        with open(path, "w") as f:
            f.write(f"[log]\nformat = {log_format}\n")
        return path

    def test_names_our_observer(self) -> None:
        """Parsing ``twistd -n im58d --config FILE`` makes twistd's
        ``--logger`` ours, and the observer it makes writes [log] format lines
        to standard output."""
        options = ServerOptions()
        options.parseOptions(["-n", "im58d", "--config", self.config("json"),
                              "--database", self.mktemp()])
        self.assertIs(options["logger"], imlog.twistd_observer)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        imlog.twistd_observer()(event("ready"))
        self.assertEqual(json.loads(out.getvalue())["text"], "ready")

    def test_operator_choices_stay(self) -> None:
        """An operator's --logger or --syslog is left as it is."""
        choices: list[dict[str, Any]] = [{"logger": "x.y"}, {"syslog": True}]
        for given in choices:
            options: dict[str, Any] = {"logfile": None, "nodaemon": True, **given}
            self.assertFalse(imlog.use_for_twistd(options, "json"))
            self.assertEqual(options.get("logger"), given.get("logger"))
        self.assertFalse(imlog.use_for_twistd(None, "json"))

    def test_logfile(self) -> None:
        """With --logfile the lines go to that file (rotated on SIGUSR1, as
        twistd's own would be)."""
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        path = os.path.abspath(self.mktemp())
        options: dict[str, Any] = {"logfile": path, "nodaemon": True, "logger": None}
        self.assertTrue(imlog.use_for_twistd(options, "text"))
        self.assertEqual(options["logger"], "im58d.logging.twistd_observer")
        imlog.twistd_observer()(event("to the file"))
        with open(path) as f:
            self.assertIn("[im58d.test#info] to the file\n", f.read())
        self.assertNotEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)


class FakeRequest:
    def __init__(self, uri: bytes, referer: bytes | None = None) -> None:
        self.uri = uri
        self.method = b"GET"
        self.clientproto = b"HTTP/1.1"
        self.code = 200
        self.sentLength = 12
        self.headers: dict[bytes, bytes | None] = {
            b"referer": referer, b"authorization": b"Bearer SECRET-B"}

    def getClientAddress(self) -> IPv4Address:
        return IPv4Address("TCP", "10.0.0.1", 50000)

    def getHeader(self, name: bytes) -> bytes | None:
        return self.headers.get(name.lower())


class AccessLogTests(SynchronousTestCase):
    def test_scrub_url(self) -> None:
        """The fragment goes, and so does every query parameter but after,
        limit and days."""
        cases = {
            b"/v1/inbox?after=3&limit=10": b"/v1/inbox?after=3&limit=10",
            b"/v1/inbox?after=3&token=SECRET": b"/v1/inbox?after=3&*",
            b"/admin#SECRET": b"/admin",
            b"/admin?SECRET#SECRET": b"/admin?*",
            b"http://h/admin?key=SECRET&days=2#x": b"http://h/admin?*&days=2",
            b"/v1/versions": b"/v1/versions",
        }
        self.assertEqual({url: imlog.scrub_url(url) for url in cases}, cases)

    def test_line(self) -> None:
        """The access log line is the combined format of the scrubbed request:
        no query secret, no fragment, no Authorization header."""
        line = imlog.access_log_formatter(
            "[t]", FakeRequest(b"/v1/inbox?after=0&token=SECRET-Q#SECRET-F",
                               b"https://h/admin?token=SECRET-R#SECRET-R")
        )
        self.assertEqual(line, '"10.0.0.1" - - [t] "GET /v1/inbox?after=0&* HTTP/1.1" 200 12 '
                               '"https://h/admin?*" "-"')


class _HTTP(Protocol):
    """One HTTP/1.0 exchange, bytes as given (a fragment included)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(self.data)


@inlineCallbacks
def http(port: int, method: str, target: str, token: str = "", body: Any = None,
         headers: dict[str, str] | None = None) -> Any:
    """``(status, json or None)`` of one request to the daemon."""
    lines = [f"{method} {target} HTTP/1.0", "Host: 127.0.0.1"]
    content = json.dumps(body).encode() if body is not None else b""
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(content)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    protocol = _HTTP("\r\n".join(lines).encode() + b"\r\n\r\n" + content)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    protocol.done.addTimeout(TIMEOUT, reactor)
    answer = yield protocol.done
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, None


def forms(secret: str | bytes) -> list[bytes]:
    """How a secret could show in a log: as is, hex, base64 (both alphabets,
    with or without padding), repr."""
    raw = secret.encode() if isinstance(secret, str) else secret
    shown = [raw, raw.hex().encode(), raw.hex().upper().encode(), repr(raw)[2:-1].encode()]
    for b64 in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        shown += [b64, b64.rstrip(b"=")]
    return [s for s in shown if len(s) >= 6]


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class NoSecretInTheLogTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_json_log_of_a_real_daemon(self) -> Any:
        """With [log] format = json every line the daemon writes is one JSON
        object, and after logins good and bad of several devices (TCP and
        HTTP), RESUMEs accepted and refused, HTTP requests with tokens (in
        the header, in a query, in a fragment), ``GET /v1/devices`` and a
        device signed out, admin requests, then a restart and RESUMEs, a
        replayed one and requests with the old tokens after it, no
        password, token, session key, proof or the admin token appears in
        the output of either run in any encoding.  (Device ids are not
        secrets: the access log shows the one in a DELETE's path.)"""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        admin_token = "adm-" + secrets.token_urlsafe(24)
        password = "pw-" + secrets.token_urlsafe(12)
        wrong = "wrong-" + secrets.token_urlsafe(12)
        config = os.path.join(directory, "im58d.ini")
        with open(config, "w") as f:
            f.write(f"[log]\nformat = json\n[admin]\ntoken = {admin_token}\n")
        daemon = Daemon(directory, extra=["--config", config])
        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        for name in ("alice", "bob"):
            out, err, code = yield admin(daemon.database, "user", "add", name,
                                         "--password", password)
            self.assertEqual(code, 0, err)
        yield admin(daemon.database, "friend", "add", "alice", "bob")
        found: list[str | bytes] = [password, wrong, admin_token]

        # the long connection: good LOGINs of two devices, a bad one, RESUMEs
        phone, tablet = new_device(), new_device()
        client = yield connect(daemon.access_port)
        welcome, _ = yield client.login("alice", password, phone, "phone")
        found += [welcome.session_key, welcome.token]
        second = yield connect(daemon.access_port)
        other, _ = yield second.login("alice", password, tablet, "tablet")
        found += [other.session_key, other.token]
        friend = yield connect(daemon.access_port)
        bobs, _ = yield friend.login("bob", password, new_device(), "bob's phone")
        found += [bobs.session_key, bobs.token]
        bad = yield connect(daemon.access_port)
        bad.send(P.Login("alice", wrong, phone, "phone"))
        self.assertEqual((yield bad.next()).code, 401)
        client.transport.loseConnection()
        yield client.lost
        resumer = yield connect(daemon.access_port)
        accepted = resume_for(welcome)
        found.append(accepted.mac)
        resumer.send(accepted)
        self.assertIsInstance((yield resumer.expect(P.Resumed)), P.Resumed)
        refused = yield connect(daemon.access_port)
        forged = accepted._replace(nonce=nonce_now().to_bytes(8, "big"),
                                   mac=secrets.token_bytes(16))
        found.append(forged.mac)
        refused.send(accepted, forged)  # a replay, a wrong proof
        self.assertEqual((yield refused.expect(P.Error)).code, 409)
        self.assertEqual((yield refused.expect(P.Error)).code, 409)

        # HTTP: logins, the session token in a header, a query and a fragment
        port = daemon.http_port
        laptop = new_device()
        status, answer = yield http(port, "POST", "/v1/login", body={
            "user": "alice", "password": password, "device_id": b64url(laptop),
            "device_name": "laptop"})
        self.assertEqual(status, 200, answer)
        token = answer["token"]
        pulled = P.Welcome(answer["uid"], unb64(answer["session_id"]),
                           unb64(answer["session_key"]), token, 0, 0, 0, 0, 0, 0)
        found += [token, pulled.session_key]
        status, _ = yield http(port, "POST", "/v1/login", body={
            "user": "alice", "password": wrong, "device_id": b64url(laptop)})
        self.assertEqual(status, 401)
        status, _ = yield http(port, "GET", "/v1/versions", token=token)
        self.assertEqual(status, 200)
        status, _ = yield http(port, "GET", f"/v1/inbox?after=0&token={token}", token=token)
        self.assertEqual(status, 200)
        yield http(port, "GET", f"/v1/versions?{token}#{token}")
        # the devices: listed (and again with the ETag), one signed out
        status, listed = yield http(port, "GET", "/v1/devices", token=token)
        self.assertEqual(status, 200, listed)
        self.assertEqual({unb64(d["id"]) for d in listed["devices"]}, {phone, tablet, laptop})
        status, _ = yield http(port, "GET", "/v1/devices", token=token,
                               headers={"If-None-Match": f'"{listed["version"]}"'})
        self.assertIn(status, (200, 304))
        yield http(port, "GET", f"/v1/devices?token={other.token}#{other.token}")
        status, _ = yield http(port, "DELETE", f"/v1/devices/{b64url(tablet)}", token=token)
        self.assertEqual(status, 204)
        kicked = yield second.next()
        while isinstance(kicked, P.Changed | P.Presence):  # what else it was told
            kicked = yield second.next()
        self.assertEqual(kicked, P.Kicked(P.KICKED_SIGNED_OUT))
        status, _ = yield http(port, "GET", "/v1/devices", token=other.token)
        self.assertEqual(status, 401)
        # admin: the right token, a wrong one, the token in a query and fragment
        wrong_admin = "adm-" + secrets.token_urlsafe(24)
        found.append(wrong_admin)
        for target in ["/v1/stats?key=k&days=1", "/metrics", "/admin"]:
            yield http(port, "GET", target, token=admin_token)
            yield http(port, "GET", target, token=wrong_admin)
        yield http(port, "GET", f"/admin?token={admin_token}#{admin_token}")
        yield http(port, "GET", f"/v1/stats?key={admin_token}&days=1", token=admin_token)

        # a restart: the sessions resume, the tokens still work
        ended = yield daemon.restart()
        self.assertTrue(ended.clean, daemon.output.decode())
        port = daemon.http_port
        for session in (welcome, pulled):
            again = yield connect(daemon.access_port)
            packet = resume_for(session)
            found.append(packet.mac)
            again.send(packet)
            self.assertIsInstance((yield again.expect(P.Resumed)), P.Resumed)
        replay = yield connect(daemon.access_port)
        replay.send(accepted)
        self.assertEqual((yield replay.expect(P.Error)).code, 409)
        status, _ = yield http(port, "GET", "/v1/devices", token=token)
        self.assertEqual(status, 200)
        status, _ = yield http(port, "GET", "/v1/versions", token=welcome.token)
        self.assertEqual(status, 200)
        status, _ = yield http(port, "DELETE", "/v1/devices/current", token=bobs.token)
        self.assertEqual(status, 204)

        ended = yield daemon.stop()
        self.assertTrue(ended.clean, daemon.output.decode())

        records = []
        for line in daemon.all_output.splitlines():
            record = json.loads(line)  # every line, not just most
            self.assertIsInstance(record, dict, line)
            self.assertIn("text", record)
            records.append(record)
        texts = "\n".join(r["text"] for r in records)
        # the log saw what happened (else its silence would prove nothing)
        self.assertIn("login uid=1 device='phone'", texts)
        self.assertIn("login uid=1 device='laptop'", texts)
        self.assertIn('"GET /v1/inbox?after=0&* HTTP/1.0" 200', texts)
        self.assertIn('"GET /v1/versions HTTP/1.0" 200', texts)
        self.assertIn('"GET /v1/devices HTTP/1.0" 200', texts)
        self.assertIn('"GET /v1/devices?* HTTP/1.0"', texts)
        self.assertIn(f'"DELETE /v1/devices/{b64url(tablet)} HTTP/1.0" 204', texts)
        self.assertIn('"DELETE /v1/devices/current HTTP/1.0" 204', texts)
        self.assertIn('"GET /admin?* HTTP/1.0"', texts)
        self.assertIn('"POST /v1/login HTTP/1.0" 401', texts)
        self.assertIn("devices online before linger here", texts)
        for secret in found:
            for shown in forms(secret):
                self.assertNotIn(shown, daemon.all_output, f"{secret!r} is in the log")
