"""The SDK's log-report recorder (``im58d.client.report``): merging, the
four triggers, persistence across a restart, retries.

Against the real server stack of a ``Harness`` through ``StubTreq``, or a
scripted HTTP double where the server has to fail; time moves only with
the Harness's clock.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
from typing import Any, cast

import msgpack
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from im58d.access.protocol import AccessProtocol
from im58d.client import Reporter, ReportFile, ReportState
from im58d.client.report import MAX_KEYS, encode_batch

from .support import NOW, Harness, add_user
from .test_client import DEVICE_ID, HTTP_URL, SDKTestCase


class Session:
    """What a Reporter needs of a logged-in client."""

    def __init__(self, http: Any, token: str | None) -> None:
        self.http = http
        self.http_url = HTTP_URL
        self.token = token


class Response:
    def __init__(self, code: int) -> None:
        self.code = code

    def content(self) -> Deferred[bytes]:
        return succeed(b"")


class ScriptedHTTP:
    """An HTTP double: each POST takes the next step of the script (a
    status code, an exception, or "server": pass it to the real site), then
    every POST goes to the real site."""

    def __init__(self, real: Any, *steps: Any) -> None:
        self.real = real
        self.steps = list(steps)
        self.posts: list[dict[str, Any]] = []  # decoded bodies, in order

    def post(self, url: str, data: bytes, headers: dict[str, str]) -> Deferred[Any]:
        body = gzip.decompress(data) if headers.get("Content-Encoding") == "gzip" else data
        self.posts.append(msgpack.unpackb(body) if "msgpack" in headers["Content-Type"]
                          else json.loads(body))
        step = self.steps.pop(0) if self.steps else "server"
        if step == "server":
            return self.real.post(url, data=data, headers=headers)  # type: ignore[no-any-return]
        if step == "lost":  # the server counts it, the answer is lost
            d: Deferred[Any] = self.real.post(url, data=data, headers=headers)
            return d.addCallback(lambda _: fail(ConnectionError("connection lost")))
        if isinstance(step, Exception):
            return fail(step)
        return succeed(Response(int(step)))


class RecorderCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.clock = self.h.reactor
        self.alice_uid = add_user(self.h.store, "alice")
        self.logged: list[str] = []
        observer = cast(ILogObserver, self._observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def _observe(self, event: LogEvent) -> None:
        self.logged.append(formatEvent(event))

    def token(self) -> str:
        code, answer = self.h.http("POST", "/v1/login",
                                   body={"user": "alice", "password": "pw",
                                         "device_id": DEVICE_ID, "device_name": "t"})
        assert code == 200
        token: str = answer["token"]
        return token

    def reporter(self, *steps: Any, state: ReportState | None = None,
                 **kwargs: Any) -> tuple[Reporter, ScriptedHTTP]:
        http = ScriptedHTTP(self.h.treq, *steps)
        reporter = Reporter(self.clock, state, session=Session(http, self.token()), **kwargs)
        return reporter, http

    def settle(self) -> None:
        for _ in range(5):
            self.h.turn()
            self.h.treq.flush()

    def timers(self, reporter: Reporter) -> list[Any]:
        """The reporter's pending timers."""
        return [call for call in self.clock.getDelayedCalls()
                if getattr(getattr(call, "func", None), "__self__", None) is reporter]

    def counted(self, key: str) -> tuple[int, int]:
        d = self.h.store.stats(key, 1, int(self.clock.seconds()))
        self.h.turn()
        row = self.successResultOf(d)[-1]
        return row["count"], row["users"]


class MergeTests(RecorderCase):
    def test_events_merge_into_counts(self) -> None:
        """Events of a key add up in one count (the map-reduce combiner);
        the batch keeps the keys in first-seen order, with t = [first, last]."""
        reporter, http = self.reporter(every_events=1000)
        for _ in range(3):
            reporter.record("click.buttonA")
        self.clock.advance(10)
        reporter.record("view.home")
        reporter.record("click.buttonA", 5)
        self.assertEqual(reporter.merging, {"click.buttonA": 8, "view.home": 1})
        self.assertEqual(http.posts, [])
        reporter.flush()
        self.settle()
        [body] = http.posts
        self.assertEqual(body["k"], ["click.buttonA", "view.home"])
        self.assertEqual(body["c"], [8, 1])
        self.assertEqual(body["t"], [NOW, NOW + 10])
        self.assertEqual(self.counted("click.buttonA"), (8, 1))
        self.assertEqual((reporter.sent, reporter.pending, reporter.merging), (1, [], {}))

    def test_bad_keys_refused_at_once(self) -> None:
        """Keys the server would refuse raise ValueError in record()."""
        reporter, _ = self.reporter()
        for key in ("", "a" * 129, "按" * 43, "tab\t"):
            self.assertRaises(ValueError, reporter.record, key)
        for n in (0, -1, 1_000_001, 1.5):
            self.assertRaises(ValueError, reporter.record, "k", n)
        self.assertEqual(reporter.merging, {})

    def test_full_batch_is_cut(self) -> None:
        """The 1,001st distinct key starts a new batch; both are taken."""
        reporter, http = self.reporter(every_events=10_000)
        for n in range(MAX_KEYS + 1):
            reporter.record(f"key.{n}")
        self.settle()
        self.assertEqual([len(b["k"]) for b in http.posts], [MAX_KEYS])
        self.assertEqual(reporter.merging, {f"key.{MAX_KEYS}": 1})
        self.assertEqual(self.counted("key.0"), (1, 1))

    def test_long_keys_stay_under_64_kib(self) -> None:
        """Keys of 128 bytes are cut into batches that fit in 64 KiB even
        without gzip."""
        reporter, http = self.reporter(every_events=10_000, gzip_from=None)
        for n in range(MAX_KEYS):
            reporter.record(f"{n:04d}" + "x" * 124)
        reporter.flush()
        self.settle()
        self.assertEqual(len(http.posts), 3)
        self.assertEqual(reporter.sent, 3)
        self.assertEqual(sum(len(b["k"]) for b in http.posts), MAX_KEYS)
        for body in http.posts:
            self.assertLess(len(encode_batch(body, "json", None)[0]), 64 * 1024)

    def test_a_count_over_a_million_is_cut(self) -> None:
        """A key whose count would pass a million starts a new batch."""
        reporter, http = self.reporter(every_events=10**9)
        reporter.record("k", 999_999)
        reporter.record("k", 2)
        self.settle()
        self.assertEqual(http.posts[0]["c"], [999_999])
        self.assertEqual(reporter.merging, {"k": 2})

    def test_encodings(self) -> None:
        """MessagePack by default, JSON on request; gzip from 256 bytes on."""
        small = {"id": "d-1", "t": [1, 2], "k": ["a"], "c": [1]}
        data, headers = encode_batch(small)
        self.assertEqual(headers, {"Content-Type": "application/msgpack"})
        self.assertEqual(msgpack.unpackb(data), small)
        data, headers = encode_batch(small, "json")
        self.assertEqual((data, headers), (b'{"id":"d-1","t":[1,2],"k":["a"],"c":[1]}',
                                           {"Content-Type": "application/json"}))
        big = dict(small, k=[f"key.{n}" for n in range(40)], c=[1] * 40)
        data, headers = encode_batch(big, "json")
        self.assertEqual(headers["Content-Encoding"], "gzip")
        self.assertEqual(json.loads(gzip.decompress(data)), big)
        self.assertRaises(ValueError, Reporter, self.clock, encoding="xml")

    def test_json_reporter(self) -> None:
        """A reporter set to JSON is understood by the server too."""
        reporter, _ = self.reporter(encoding="json", gzip_from=1)
        reporter.record("k")
        reporter.flush()
        self.settle()
        self.assertEqual(self.counted("k"), (1, 1))


class TriggerTests(RecorderCase):
    def test_every_y_events(self) -> None:
        """The Y-th event cuts the batch and sends it at once."""
        reporter, http = self.reporter(every_events=5)
        for _ in range(4):
            reporter.record("click")
        self.settle()
        self.assertEqual(http.posts, [])
        reporter.record("view")
        self.settle()
        self.assertEqual([(b["k"], b["c"]) for b in http.posts], [(["click", "view"], [4, 1])])
        self.assertEqual(self.counted("click"), (4, 1))

    def test_x_minutes_after_the_first_event(self) -> None:
        """A batch goes X minutes after its first event; with no events the
        reporter sets no timer at all."""
        reporter, http = self.reporter(every_minutes=2, every_events=100)
        self.assertEqual(self.timers(reporter), [])
        reporter.record("click")
        self.clock.advance(60)
        reporter.record("click")
        self.clock.advance(59)
        self.settle()
        self.assertEqual(http.posts, [])
        self.clock.advance(1)
        self.settle()
        self.assertEqual([b["c"] for b in http.posts], [[2]])
        self.assertEqual(self.counted("click"), (2, 1))
        self.assertEqual(self.timers(reporter), [])

    def test_y_events_cancel_the_timer(self) -> None:
        """A batch cut by Y events takes its timer with it: the next batch
        waits X minutes from its own first event."""
        reporter, http = self.reporter(every_minutes=1, every_events=2)
        reporter.record("a")
        self.clock.advance(30)
        reporter.record("a")
        reporter.record("b")
        self.clock.advance(45)
        self.settle()
        self.assertEqual(len(http.posts), 1)
        self.clock.advance(15)
        self.settle()
        self.assertEqual([b["k"] for b in http.posts], [["a"], ["b"]])


class RetryTests(RecorderCase):
    def test_retry_with_the_same_id_and_backoff(self) -> None:
        """A 503 and a network error are retried with backoff, the same
        batch id each time; then it is counted once."""
        reporter, http = self.reporter(503, ConnectionError("down"), min_backoff=10,
                                       max_backoff=100)
        reporter.record("click")
        reporter.flush()
        self.settle()
        self.assertEqual(len(http.posts), 1)
        self.clock.advance(4.9)  # the first wait is 5 to 15 s
        self.assertEqual(len(http.posts), 1)
        self.clock.advance(10.1)
        self.settle()
        self.assertEqual(len(http.posts), 2)
        self.clock.advance(9.9)  # the second is 10 to 30 s
        self.assertEqual(len(http.posts), 2)
        self.clock.advance(20.1)
        self.settle()
        self.assertEqual([b["id"] for b in http.posts], [http.posts[0]["id"]] * 3)
        self.assertEqual((reporter.sent, reporter.pending), (1, []))
        self.assertEqual(self.counted("click"), (1, 1))

    def test_lost_answer_counted_once(self) -> None:
        """When the server took a batch but its answer was lost, the retry
        (same id) is a 204 that counts nothing."""
        reporter, http = self.reporter("lost", min_backoff=1)
        reporter.record("click", 3)
        reporter.flush()
        self.settle()
        self.assertEqual(len(reporter.pending), 1)
        self.clock.advance(2)
        self.settle()
        self.assertEqual(len(http.posts), 2)
        self.assertEqual(reporter.pending, [])
        self.assertEqual(self.counted("click"), (3, 1))
        self.assertEqual(self.h.store.report_repeats, 1)

    def test_429_is_retried(self) -> None:
        """429 backs off like a 503."""
        reporter, http = self.reporter(429, min_backoff=1)
        reporter.record("click")
        reporter.flush()
        self.clock.advance(2)
        self.settle()
        self.assertEqual((len(http.posts), reporter.sent), (2, 1))

    def test_4xx_drops_the_batch(self) -> None:
        """400 or 413: sending again cannot help; the batch is dropped with a
        log line and the next one goes."""
        reporter, http = self.reporter(400, 413)
        reporter.record("a")
        reporter.flush()
        reporter.record("b")
        reporter.flush()
        reporter.record("c")
        reporter.flush()
        self.settle()
        self.assertEqual((reporter.sent, reporter.dropped, reporter.pending), (1, 2, []))
        self.assertEqual([b["k"] for b in http.posts], [["a"], ["b"], ["c"]])
        refused = [line for line in self.logged if "refused with HTTP" in line]
        self.assertEqual(len(refused), 2)
        self.assertIn(http.posts[0]["id"], refused[0])
        self.assertEqual(self.timers(reporter), [])

    def test_401_waits_for_the_next_login(self) -> None:
        """401 keeps the batch and sets no timer; the next login sends it."""
        reporter, http = self.reporter(401)
        reporter.record("click")
        reporter.flush()
        self.settle()
        self.assertEqual((len(reporter.pending), self.timers(reporter)), (1, []))
        reporter.session.token = self.token()
        reporter.logged_in(first=False)
        self.settle()
        self.assertEqual((reporter.sent, reporter.pending), (1, []))
        self.assertEqual(http.posts[0]["id"], http.posts[1]["id"])

    def test_not_logged_in(self) -> None:
        """Without a token batches wait; flush() fires all the same."""
        reporter, http = self.reporter()
        reporter.session.token = None
        reporter.record("click")
        d = reporter.flush()
        self.successResultOf(d)
        self.assertEqual((http.posts, len(reporter.pending)), ([], 1))

    def test_old_and_surplus_batches_dropped(self) -> None:
        """Batches older than max_age, or past max_pending, are dropped
        (the server answers 401 until the next login)."""
        reporter, http = self.reporter(401, 401, 401, max_pending=2, max_age=3600)
        for key in ("a", "b", "c"):
            reporter.record(key)
            reporter.flush()
            self.clock.advance(1000)
        self.settle()
        self.assertEqual([b["k"] for b in reporter.pending], [["b"], ["c"]])
        self.assertEqual(reporter.dropped, 1)
        self.clock.advance(1601)  # "b" is an hour old
        reporter.session.token = self.token()
        reporter.logged_in(first=False)
        self.settle()
        self.assertEqual(reporter.dropped, 2)
        self.assertEqual(http.posts[-1]["k"], ["c"])
        self.assertEqual(self.counted("b"), (0, 0))
        self.assertEqual(self.counted("c"), (1, 1))


class PersistenceTests(RecorderCase):
    def test_unsent_batches_survive_a_restart(self) -> None:
        """Batches not delivered are in the state file; after a restart the
        new reporter sends them with the same ids and goes on numbering."""
        path = self.mktemp()
        reporter, http = self.reporter(503, 503, state=ReportFile(path), min_backoff=60)
        reporter.record("a")
        reporter.flush()
        reporter.record("b", 2)
        reporter.flush()
        self.settle()
        ids = [b["id"] for b in reporter.pending]
        self.assertEqual(len(set(ids)), 2)
        with open(path, encoding="utf-8") as f:
            self.assertEqual([b["id"] for b in json.load(f)["pending"]], ids)
        # the app is killed; it starts again
        again, http2 = self.reporter(state=ReportFile(path))
        self.assertEqual([b["id"] for b in again.pending], ids)
        again.logged_in(first=True)
        again.record("c")
        again.flush()
        self.settle()
        self.assertEqual([b["id"] for b in http2.posts][:2], ids)
        self.assertNotIn(http2.posts[2]["id"], ids)
        self.assertEqual(http2.posts[2]["id"].rsplit("-", 1)[0], ids[0].rsplit("-", 1)[0])
        self.assertEqual((self.counted("a"), self.counted("b"), self.counted("c")),
                         ((1, 1), (2, 1), (1, 1)))
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.load(f)["pending"], [])

    def test_state_file_is_private(self) -> None:
        """The state file is written with mode 0600, also over a file that
        had another mode."""
        path = self.mktemp()
        state = ReportFile(path)
        state.take_id()
        state.save()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        os.chmod(path, 0o644)
        state.save()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_batch_ids_unique_per_device(self) -> None:
        """Ids are "<device>-<n>": n grows across restarts; a new device (or
        a lost file) gets another device id."""
        path = self.mktemp()
        first = ReportFile(path)
        ids = [first.take_id(), first.take_id()]
        first.save()
        ids.append(ReportFile(path).take_id())
        self.assertEqual([i.rsplit("-", 1)[1] for i in ids], ["1", "2", "3"])
        self.assertNotEqual(ReportState().device, ReportState().device)
        os.remove(path)
        self.assertNotEqual(ReportFile(path).device, first.device)

    def test_unreadable_file(self) -> None:
        """A damaged state file is logged and replaced by a fresh state."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("{not json")
        state = ReportFile(path)
        self.assertEqual((state.next_batch, state.pending), (1, []))
        self.assertTrue(any("unreadable" in line for line in self.logged))


class ClientHookTests(SDKTestCase):
    """The reporter inside the SDK ``Client``."""

    def reporting_device(self, **kwargs: Any) -> tuple[Any, Reporter]:
        reporter = Reporter(self.h.reactor, **kwargs)
        return self.device("alice", reporter=reporter), reporter

    def counted(self, key: str) -> int:
        d = self.h.store.stats(key, 1, int(self.h.reactor.seconds()))
        self.h.turn()
        return int(self.successResultOf(d)[-1]["count"])

    def reports(self, device: Any) -> int:
        return int(device.http.requests.count(("POST", "/v1/report")))

    def test_sent_when_the_app_opens(self) -> None:
        """Events recorded before the first login (and batches of the last
        run) go right after WELCOME."""
        alice, reporter = self.reporting_device()
        reporter.record("app.open")
        self.start(alice)
        self.assertEqual(self.reports(alice), 1)
        self.assertEqual(self.counted("app.open"), 1)

    def test_reconnect_does_not_cut(self) -> None:
        """A later login (a reconnect) sends what waits but leaves the batch
        being merged alone."""
        alice, reporter = self.reporting_device()
        self.start(alice)
        reporter.record("click")
        alice.link.cut()
        self.wait(5)
        self.assertTrue(alice.client.connected)
        self.assertEqual(alice.client.resumes, 1)
        self.assertEqual((self.reports(alice), reporter.merging), (0, {"click": 1}))

    def test_sent_when_the_app_exits_before_bye(self) -> None:
        """stop() sends the batch first (its token still works), then BYE."""
        alice, reporter = self.reporting_device()
        self.start(alice)
        reporter.record("click", 7)
        stopped = alice.client.stop()
        self.settle()
        self.successResultOf(stopped)
        self.assertEqual(self.counted("click"), 7)
        self.assertIsNone(self.h.router.user(self.alice_uid))  # offline: BYE
        # no timer of the client or the reporter is left (the server's
        # connection may still wait out its close)
        self.assertEqual([call for call in self.h.reactor.getDelayedCalls()
                          if not isinstance(getattr(call.func, "__self__", None),
                                            AccessProtocol)], [])

    def test_exit_does_not_wait_forever(self) -> None:
        """When the report cannot go, stop() says BYE after exit_timeout and
        the batch stays for the next run."""
        alice, reporter = self.reporting_device(exit_timeout=5)
        self.start(alice)
        reporter.record("click")
        self.patch(alice.http, "post", lambda url, **kw: Deferred())  # never answered
        stopped = alice.client.stop()
        self.settle()
        self.assertNoResult(stopped)
        self.h.reactor.advance(5)
        self.settle()
        self.successResultOf(stopped)
        self.assertIsNone(self.h.router.user(self.alice_uid))  # offline: BYE
        self.assertEqual(len(reporter.pending), 1)
