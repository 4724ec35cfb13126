"""The admin page (``GET /admin``) and its JSON (``/admin/api/``): in memory,
then in a real headless Chromium against the real daemon."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import time
from html.parser import HTMLParser
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from im58d.store.sqlite import SQLiteStore
from im58d.web import admin
from im58d.web.root import make_site
from im58d.wire import packets as P

from .e2e import Daemon, connect, free_port
from .e2e import admin as run_admin
from .support import NOW, ImmediateThread
from .test_messages import b64, named_device
from .test_metrics import MetricsTestCase

TOKEN = "admin-secret"
DAY = 86400
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_TIMEOUT = 60.0


def utc_day(now: float) -> str:
    return datetime.datetime.fromtimestamp(int(now), datetime.UTC).date().isoformat()


def window(days: int, now: float) -> list[str]:
    """The last ``days`` UTC days up to today's, oldest first."""
    return [utc_day(now - n * DAY) for n in range(days - 1, -1, -1)]


class AdminTestCase(MetricsTestCase):
    def auth(self, token: str = TOKEN) -> dict[str, list[str]]:
        return {"Authorization": [f"Bearer {token}"]}


class PageTests(AdminTestCase):
    """The page as served, without a browser."""

    def test_one_self_contained_page(self) -> None:
        """/admin (and /admin/) is one HTML page that loads nothing: no src or
        href, no URL but the SVG namespace; its CSP allows only its own
        script and style (by hash) and requests to the daemon itself."""
        for path in ("/admin", "/admin/"):
            code, headers, page = self.get(path)
            self.assertEqual(code, 200)
            self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
            self.assertEqual(headers.getRawHeaders("referrer-policy"), ["no-referrer"])
            self.assertNotRegex(page, r"(?i)\b(src|href)\s*=")
            self.assertEqual(
                re.findall(r"[a-z]+://[^\s\"']+", page), ["http://www.w3.org/2000/svg"]
            )
        csp = headers.getRawHeaders("content-security-policy")[0]
        script = re.search(r"<script>(.*)</script>", page, re.S)
        style = re.search(r"<style>(.*)</style>", page, re.S)
        assert script is not None and style is not None
        for source, directive in ((script.group(1), "script-src"), (style.group(1), "style-src")):
            digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
            self.assertIn(f"{directive} 'sha256-{digest}';", csp)
        self.assertIn("default-src 'none';", csp)
        self.assertIn("connect-src 'self';", csp)

    def test_token_stays_in_the_browser(self) -> None:
        """The page takes the token from the fragment, clears it from the
        address bar and sends it only as a bearer header."""
        page = admin.PAGE.decode()
        self.assertIn("location.hash", page)
        self.assertIn("history.replaceState", page)
        self.assertIn('"Authorization": "Bearer " + token', page)

    def test_off_without_admin_token(self) -> None:
        """Without an admin token configured the page is off, like the API."""
        site = make_site(self.h.iplist, self.h.sessions, self.h.store, self.h.reactor,
                         metrics=self.metrics)
        self.treq = StubTreq(site.resource)
        code, _, body = self.get("/admin")
        self.assertEqual(code, 403)
        self.assertEqual(json.loads(body)["error"]["code"], "forbidden")

    def test_get_only(self) -> None:
        """Other methods get a JSON 405; unknown paths a JSON 404."""
        d = self.treq.post("http://im58d.test/admin", data=b"")
        self.h.turn()
        self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
        self.assertEqual(self.get("/admin/nothing")[0], 404)
        self.assertEqual(self.get("/admin/api/nothing", self.auth())[0], 404)


class APITests(AdminTestCase):
    """/admin/api/: admin token only (a loopback client needs it too)."""

    def test_token_needed_even_from_loopback(self) -> None:
        """401 without a token, 403 with a wrong one, from any address."""
        for path in ("/admin/api/summary", "/admin/api/keys"):
            code, headers, body = self.get(path)
            self.assertEqual(code, 401)
            self.assertEqual(headers.getRawHeaders("www-authenticate"), ["Bearer"])
            self.assertEqual(self.get(path, self.auth("wrong"))[0], 403)
            self.assertEqual(self.get(path, self.auth(self.alice_token))[0], 403)

    def test_summary(self) -> None:
        """The live figures: sessions, connections, messages, commits."""
        self.alice.send(P.MsgR(1, self.bob_uid, "hi"))
        self.bob.send(P.AckR(1))
        self.h.reactor.advance(30)
        self.bob.drop()
        code, _, body = self.get("/admin/api/summary", self.auth())
        self.assertEqual(code, 200, body)
        summary = json.loads(body)
        self.assertEqual(summary["connections"], 1)
        self.assertEqual(summary["sessions"], {"online": 1, "lingering": 1})
        self.assertEqual(summary["messages"], {
            "in": 1, "out": 1, "stored": 1, "duplicates": 0, "retransmits": 0,
            "acks_in": 1, "acks_out": 1,
        })
        self.assertEqual(summary["per_minute"], {"in": 2.0, "out": 2.0, "window_s": 30.0})
        self.assertEqual(summary["uptime_s"], 30.0)
        self.assertEqual(summary["commits"]["count"], self.h.store.batches)
        self.assertEqual(summary["commits"]["latency_ms"]["p99"], 0)  # the clock stood still
        self.assertEqual(summary["report_batches"], 0)

    def test_summary_counts_devices(self) -> None:
        """Sessions online and lingering are devices: a second device of a
        user online counts, and so does a third one lingering."""
        tablet = self.h.connect()
        tablet.login("alice", device=named_device("alice-tablet"))
        laptop = self.h.connect()
        laptop.login("alice", device=named_device("alice-laptop"))
        laptop.drop()
        code, _, body = self.get("/admin/api/summary", self.auth())
        self.assertEqual(code, 200, body)
        summary = json.loads(body)
        self.assertEqual(summary["sessions"], {"online": 3, "lingering": 1})
        self.assertEqual(summary["connections"], 3)

    def test_keys(self) -> None:
        """The top report keys over the last D days, each with its count and
        distinct users per day, zeros where nothing came."""
        store = self.h.store
        store.record_report(self.alice_uid, "a1", {"click.a": 3, "view.home": 1}, NOW)
        store.record_report(self.bob_uid, "b1", {"click.a": 2}, NOW)
        store.record_report(self.bob_uid, "b2", {"click.a": 5}, NOW - 2 * DAY)
        store.record_report(self.bob_uid, "old", {"view.old": 99}, NOW - 9 * DAY)
        self.h.turn()
        code, _, body = self.get("/admin/api/keys?days=3", self.auth())
        self.assertEqual(code, 200, body)
        days = window(3, NOW)
        self.assertEqual(json.loads(body), {"days": 3, "keys": [
            {"key": "click.a", "count": 10, "users": 2, "days": [
                {"day": days[0], "count": 5, "users": 1},
                {"day": days[1], "count": 0, "users": 0},
                {"day": days[2], "count": 5, "users": 2},
            ]},
            {"key": "view.home", "count": 1, "users": 1, "days": [
                {"day": days[0], "count": 0, "users": 0},
                {"day": days[1], "count": 0, "users": 0},
                {"day": days[2], "count": 1, "users": 1},
            ]},
        ]})
        code, _, body = self.get("/admin/api/keys?days=3&limit=1", self.auth())
        self.assertEqual([k["key"] for k in json.loads(body)["keys"]], ["click.a"])
        code, _, body = self.get("/admin/api/keys?days=1", self.auth())
        self.assertEqual(json.loads(body)["keys"][0]["days"], [
            {"day": days[2], "count": 5, "users": 2}
        ])

    def test_keys_bad_query(self) -> None:
        """days and limit out of range: 400 naming them."""
        for query, name in (("days=0", "days"), ("days=367", "days"), ("limit=51", "limit"),
                            ("days=x", "days")):
            code, _, body = self.get("/admin/api/keys?" + query, self.auth())
            self.assertEqual(code, 400)
            self.assertIn(name, json.loads(body)["error"]["message"])

    def test_keys_when_the_store_fails(self) -> None:
        """A store error is a JSON 500 (and logged), not a hang."""

        def broken(*args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            d.errback(RuntimeError("disk on fire"))
            return d

        self.h.store.record_report(self.alice_uid, "a1", {"click.a": 1}, NOW)
        self.h.turn()
        self.patch(self.h.store, "stats", broken)
        code, _, body = self.get("/admin/api/keys", self.auth())
        self.assertEqual(code, 500)
        self.assertEqual(json.loads(body)["error"]["code"], "internal")
        self.assertTrue(self.flushLoggedErrors(RuntimeError))


# -- in a real browser, against the real daemon ---------------------------------


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser(ProcessProtocol):
    """A headless Chromium that prints the DOM of a page once its scripts ran."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


@inlineCallbacks
def dump_dom(binary: str, url: str, profile: str) -> Any:
    """The DOM of ``url`` after 5 s of the page's (virtual) time."""
    browser = Browser()
    argv = [
        binary, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
        "--no-first-run", "--disable-extensions", "--disable-background-networking",
        f"--user-data-dir={profile}", "--dump-dom", url,
    ]
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    reactor.spawnProcess(browser, binary, argv, env=env)
    transport: Any = browser.transport

    def kill() -> None:
        try:
            transport.signalProcess("KILL")
        except Exception:
            pass

    timer = reactor.callLater(BROWSER_TIMEOUT, kill)
    code = yield browser.ended
    if timer.active():
        timer.cancel()
    else:
        raise AssertionError(f"chromium took over {BROWSER_TIMEOUT} s:\n{browser.err.decode()}")
    if code != 0:
        raise AssertionError(f"chromium exited with {code}:\n{browser.err.decode()}")
    return browser.out.decode("utf-8")


class Dom(HTMLParser):
    """The elements of a dumped DOM: by id, and the charts' marks by key."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.marks: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self.rows: list[dict[str, str]] = []
        self._key: str | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if "id" in values:
            self.by_id[values["id"]] = values
        if tag == "svg" and "data-key" in values:
            self._key = values["data-key"]
            self.marks[self._key] = []
        elif self._key is not None and tag in ("rect", "circle"):
            self.marks[self._key].append((tag, values))
        elif tag == "tr" and "data-key" in values:
            self.rows.append(values)

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._key = None

    def value(self, element_id: str) -> str:
        return self.by_id[element_id].get("data-value", "")

    def series(self, key: str, tag: str) -> list[tuple[str, int, int]]:
        """(day, count, users) of each bar (rect) or point (circle) of a chart."""
        return [
            (v["data-day"], int(v["data-count"]), int(v["data-users"]))
            for t, v in self.marks[key] if t == tag
        ]


class BrowserTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        binary = find_chromium()
        if binary is None:
            raise SkipTest(f"no Chromium binary on PATH (looked for {', '.join(CHROMIUM_NAMES)})")
        self.chromium = binary
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    @inlineCallbacks
    def post(self, daemon: Daemon, path: str, body: Any, token: str | None = None) -> Any:
        headers: dict[bytes | str, list[bytes | str]] = {"Content-Type": ["application/json"]}
        if token:
            headers["Authorization"] = [f"Bearer {token}"]
        response = yield self.http.post(
            f"http://127.0.0.1:{daemon.http_port}{path}", data=json.dumps(body).encode(),
            headers=headers,
        )
        content = yield response.content()
        return response.code, json.loads(content) if content else None

    @inlineCallbacks
    def test_charts_from_real_reports(self) -> Any:
        """The real daemon with reports from two users over several days (by
        the store's API before the start, and by POST /v1/report over HTTP)
        and one message between them: Chromium loads /admin#token=..., the
        page fetches its JSON with the token, and the DOM holds one chart per
        top key whose bars and points carry exactly the day, count and
        distinct users reported, beside the live figures."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "im58d.ini")
        with open(config, "w") as f:
            f.write(f"[admin]\ntoken = {TOKEN}\n")
        daemon = Daemon(directory, ["--config", config], ports=(free_port(), free_port()))
        uids = {}
        for name in ("alice", "bob"):
            out, err, code = yield run_admin(daemon.database, "user", "add", name,
                                             "--password", "pw")
            self.assertEqual(code, 0, err)
            uids[name] = int(out)

        # earlier days, through the store's API on the daemon's database
        now = time.time()
        store = SQLiteStore(daemon.database, reactor, thread=ImmediateThread())
        yield store.start()
        alice, bob = uids["alice"], uids["bob"]
        for uid, batch, counts, ago in (
            (alice, "past-1", {"click.a": 7}, 1),
            (alice, "past-3", {"click.a": 1}, 3),
            (bob, "past-3", {"click.a": 1, "view.home": 2}, 3),
        ):
            self.assertTrue((yield store.record_report(uid, batch, counts, int(now - ago * DAY))))
        yield store.stop()

        self.addCleanup(daemon.cleanup)
        yield daemon.start()
        # today, over HTTP: three batches counted, one repeat ignored
        tokens = {}
        for name in ("alice", "bob"):
            code, body = yield self.post(
                daemon, "/v1/login",
                {"user": name, "password": "pw", "device_id": b64(named_device(f"{name}-web"))},
            )
            self.assertEqual(code, 200, body)
            tokens[name] = body["token"]
        t = [int(now) - 60, int(now)]
        for name, batch, counts in (
            ("alice", "a1", {"click.a": 3, "view.home": 1}),
            ("bob", "b1", {"click.a": 2}),
            ("bob", "b2", {"click.a": 4}),
            ("alice", "a1", {"click.a": 3, "view.home": 1}),
        ):
            report = {"id": batch, "t": t, "k": list(counts), "c": list(counts.values())}
            code, body = yield self.post(daemon, "/v1/report", report, tokens[name])
            self.assertEqual(code, 204, body)

        # one message and its receipt between two connected users
        a = yield connect(daemon.access_port)
        self.addCleanup(a.transport.loseConnection)
        a.send(P.Login("alice", "pw", named_device("alice-e2e")))
        self.assertIsInstance((yield a.next()), P.Welcome)
        self.assertEqual((yield a.next()), P.Online(()))
        b = yield connect(daemon.access_port)
        self.addCleanup(b.transport.loseConnection)
        b.send(P.Login("bob", "pw", named_device("bob-e2e")))
        self.assertIsInstance((yield b.next()), P.Welcome)
        self.assertEqual((yield b.next()), P.Online(()))
        a.send(P.MsgR(1, bob, "hi"))
        self.assertIsInstance((yield a.next()), P.MsgA)
        msg_n = yield b.next()
        self.assertEqual((msg_n.sender, msg_n.body), (alice, "hi"))
        b.send(P.AckR(msg_n.seq))
        self.assertIsInstance((yield b.next()), P.AckA)
        self.assertIsInstance((yield a.next()), P.AckN)

        url = f"http://127.0.0.1:{daemon.http_port}/admin?days=7#token={TOKEN}"
        html = yield dump_dom(self.chromium, url, os.path.join(directory, "chromium"))
        if utc_day(time.time()) != utc_day(now):
            raise SkipTest("the UTC day changed during the test")
        dom = Dom(html)

        self.assertEqual(dom.by_id["status"].get("data-state"), "ok", html)
        self.assertEqual(dom.value("sessions-online"), "2")
        self.assertEqual(dom.value("sessions-lingering"), "0")
        self.assertEqual(dom.value("connections"), "2")
        self.assertEqual(dom.value("messages-in"), "1")
        self.assertEqual(dom.value("messages-out"), "1")
        self.assertEqual(dom.value("acks-in"), "1")
        self.assertEqual(dom.value("acks-out"), "1")
        self.assertEqual(dom.value("report-batches"), "3")
        self.assertGreater(float(dom.value("messages-in-per-minute")), 0)
        self.assertGreaterEqual(float(dom.value("commit-p50")), 0)
        self.assertGreaterEqual(float(dom.value("commit-p99")), float(dom.value("commit-p50")))
        self.assertGreaterEqual(int(dom.value("commits")), 1)

        days = window(7, now)
        expected = {
            "click.a": {days[6]: (9, 2), days[5]: (7, 1), days[3]: (2, 2)},
            "view.home": {days[6]: (1, 1), days[3]: (2, 1)},
        }
        self.assertEqual(
            [(r["data-key"], r["data-count"], r["data-users"]) for r in dom.rows],
            [("click.a", "18", "2"), ("view.home", "3", "2")],
        )
        self.assertEqual(sorted(dom.marks), sorted(expected))
        for key, reported in expected.items():
            want = [(day, *reported.get(day, (0, 0))) for day in days]
            self.assertEqual(dom.series(key, "rect"), want, key)
            self.assertEqual(dom.series(key, "circle"), want, key)

        ended = yield daemon.stop(signal.SIGTERM)
        self.assertTrue(ended.clean, daemon.output.decode())
        self.assertNotIn(b"Traceback", daemon.output)
        self.assertNotIn(TOKEN.encode(), daemon.output)  # the fragment is never sent
