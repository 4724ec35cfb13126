"""``GET /metrics`` (PROTOCOL.md section 2): the daemon's counters in the
Prometheus text format, read at scrape time; histograms once per commit;
the admin token, or a loopback client."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from im58d.metrics import Metrics, batch_size, percentile
from im58d.store.inbox import deliver_txn
from im58d.web.root import make_site
from im58d.wire import packets as P

from .support import Harness, add_user

TOKEN = "admin-secret"


def scrape_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text as {(sample name, sorted labels): value}."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def render(site: Any, path: bytes, host: str, token: str | None = None) -> tuple[int, bytes]:
    """A GET through the site's tree from a client at ``host``: (status, body)."""
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.uri = path
    request.client = IPv4Address("TCP", host, 40000)
    if token is not None:
        request.requestHeaders.addRawHeader(b"authorization", b"Bearer " + token.encode())
    resource = getChildForRequest(site.resource, request)
    body = resource.render(request)
    assert isinstance(body, bytes)
    return request.responseCode or 200, body


class HeldThread:
    """A database thread whose jobs wait until the test releases them."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, fn: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((fn, args, d))
        return d

    def release(self) -> None:
        jobs, self.jobs = self.jobs, []
        for fn, args, d in jobs:
            d.callback(fn(*args))


class MetricsTestCase(SynchronousTestCase):
    """Two users logged in on a harness whose site serves /metrics."""

    admin_token = TOKEN

    def setUp(self) -> None:
        self.h = Harness()
        self.metrics = Metrics(
            self.h.reactor, self.h.factory, self.h.router, self.h.messenger, self.h.store,
            process=False,
        )
        self.metrics.sample()
        self.site = make_site(
            self.h.iplist, self.h.sessions, self.h.store, self.h.reactor,
            admin_token=self.admin_token, metrics=self.metrics,
        )
        self.treq: Any = StubTreq(self.site.resource)
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.alice = self.h.connect("10.0.0.1")
        self.alice_token = self.alice.login("alice").token
        self.bob = self.h.connect("10.0.0.2")
        self.bob.login("bob")

    def get(self, path: str, headers: dict[str, list[str]] | None = None) -> tuple[int, Any, str]:
        """A GET from a loopback client (StubTreq's address): (status,
        headers, body)."""
        response, content = self.h.request("GET", path, headers, treq=self.treq)
        return response.code, response.headers, content.decode()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, headers, text = self.get("/metrics")
        self.assertEqual(code, 200, text)
        return scrape_text(text)

    def value(self, name: str, **labels: str) -> float:
        return self.scrape()[(name, tuple(sorted(labels.items())))]


class ExpositionTests(MetricsTestCase):
    def test_prometheus_text_format(self) -> None:
        """/metrics answers the Prometheus text format (version 0.0.4 by
        default), uncached, with every family the operator needs."""
        code, headers, text = self.get("/metrics")
        self.assertEqual(code, 200)
        content_type = headers.getRawHeaders("content-type")[0]
        self.assertTrue(content_type.startswith("text/plain; version="), content_type)
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])
        names = {family.name for family in text_string_to_metric_families(text)}
        for name in (
            "im58d_connections", "im58d_sessions", "im58d_messages_in", "im58d_messages_out",
            "im58d_acks_in", "im58d_acks_out", "im58d_retransmits", "im58d_dedup_hits",
            "im58d_commit_batch_size", "im58d_commit_latency_seconds",
            "im58d_report_batches", "im58d_info",
        ):
            self.assertIn(name, names)

    def test_openmetrics_when_asked(self) -> None:
        """A scraper that asks for OpenMetrics gets it."""
        code, headers, text = self.get(
            "/metrics", {"Accept": ["application/openmetrics-text; version=1.0.0"]}
        )
        self.assertEqual(code, 200)
        self.assertTrue(
            headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
        )
        self.assertTrue(text.endswith("# EOF\n"))

    def test_connections_and_sessions(self) -> None:
        """Connections and sessions are read when scraped: online while a
        connection carries the session, lingering after it drops."""
        self.assertEqual(self.value("im58d_connections"), 2)
        self.assertEqual(self.value("im58d_sessions", state="online"), 2)
        self.assertEqual(self.value("im58d_sessions", state="lingering"), 0)
        self.bob.drop()
        self.h.connect("10.0.0.3")  # not logged in yet: a connection, no session
        self.assertEqual(self.value("im58d_connections"), 2)
        self.assertEqual(self.value("im58d_sessions", state="online"), 1)
        self.assertEqual(self.value("im58d_sessions", state="lingering"), 1)

    def test_sessions_count_devices(self) -> None:
        """Sessions are counted per device: a user on three devices counts
        three; a device that dropped lingers, one that said BYE or was signed
        in over HTTP only (offline) counts nowhere."""
        devices = [self.alice]
        for name in (b"alice-tablet....", b"alice-laptop...."):
            client = self.h.connect()
            client.login("alice", device=name)
            devices.append(client)
        self.assertEqual(self.value("im58d_sessions", state="online"), 4)
        devices[1].drop()
        devices[2].send(P.Bye())
        devices[2].drop()  # the client closes its side after BYE
        self.h.http("POST", "/v1/login", body={
            "user": "alice", "password": "pw", "device_id": "YWxpY2Utd2ViLi4uLi4uLg"})
        self.assertEqual(self.value("im58d_sessions", state="online"), 2)
        self.assertEqual(self.value("im58d_sessions", state="lingering"), 1)
        self.assertEqual(self.value("im58d_connections"), 2)
        self.assertEqual(self.metrics.summary()["sessions"], {"online": 2, "lingering": 1})

    def test_message_counters_move(self) -> None:
        """Messages in and out, acks both ways, de-dup hits and retransmits
        follow the traffic."""
        before = self.scrape()
        self.alice.send(P.MsgR(1, self.bob_uid, "one"), P.MsgR(2, self.bob_uid, "two"))
        self.alice.send(P.MsgR(2, self.bob_uid, "two"))  # a retransmission: de-dup
        self.bob.received()
        self.bob.send(P.AckR(1))
        # the second MSG_N is not acked: sent again once the ack is late
        self.h.reactor.advance(11)
        self.h.messenger.resend_late()
        after = self.scrape()

        def moved(name: str) -> float:
            return after[(name, ())] - before[(name, ())]

        self.assertEqual(moved("im58d_messages_in_total"), 3)
        self.assertEqual(moved("im58d_messages_stored_total"), 2)
        self.assertEqual(moved("im58d_messages_out_total"), 2)
        self.assertEqual(moved("im58d_dedup_hits_total"), 1)
        self.assertEqual(moved("im58d_acks_in_total"), 1)
        self.assertEqual(moved("im58d_acks_out_total"), 1)
        self.assertEqual(moved("im58d_retransmits_total"), 1)

    def test_report_batches(self) -> None:
        """Report batches counted by the store show; a repeated batch does not."""
        headers = {"Authorization": [f"Bearer {self.alice_token}"],
                   "Content-Type": ["application/json"]}
        body = json.dumps({"id": "b1", "t": [1, 2], "k": ["click.a"], "c": [3]}).encode()
        for _ in range(2):
            d = self.treq.post("http://im58d.test/v1/report", data=body, headers=headers)
            self.h.turn()
            self.treq.flush()
            self.assertEqual(self.successResultOf(d).code, 204)
        self.assertEqual(self.value("im58d_report_batches_total"), 1)


class ClusterMetricsTests(MetricsTestCase):
    def test_several_nodes(self) -> None:
        """With several nodes, the scrape shows whether the node is joined
        through Redis, the live nodes, publications both ways, Redis
        outages and the pushes caught up from the store; one node shows
        none of the Redis families."""
        names = {family.name for family in text_string_to_metric_families(self.get(
            "/metrics")[2])}
        self.assertNotIn("im58d_redis_up", names)
        self.assertEqual(self.value("im58d_caught_up_total"), 0)
        router = self.h.router
        router.clustered = True
        router.up, router.live_nodes = True, 3
        router.published, router.received, router.outages = 10, 7, 1
        self.h.messenger.caught_up = 4
        self.assertEqual(self.value("im58d_redis_up"), 1)
        self.assertEqual(self.value("im58d_cluster_nodes"), 3)
        self.assertEqual(self.value("im58d_redis_published_total"), 10)
        self.assertEqual(self.value("im58d_redis_received_total"), 7)
        self.assertEqual(self.value("im58d_redis_outages_total"), 1)
        self.assertEqual(self.value("im58d_caught_up_total"), 4)
        router.up = False
        self.assertEqual(self.value("im58d_redis_up"), 0)


class HistogramTests(MetricsTestCase):
    def test_one_observation_per_commit(self) -> None:
        """A commit is observed once, with its messages and acks as its size,
        however many messages it holds; the count is the store's commits."""
        before = self.scrape()
        self.alice.send(*[P.MsgR(cmid, self.bob_uid, "hi") for cmid in range(1, 6)])
        after = self.scrape()
        count, total = "im58d_commit_batch_size_count", "im58d_commit_batch_size_sum"
        self.assertEqual(after[(count, ())] - before[(count, ())], 1)
        self.assertEqual(after[(total, ())] - before[(total, ())], 5)
        self.assertEqual(after[(count, ())], self.h.store.batches)
        self.assertEqual(
            after[("im58d_commit_latency_seconds_count", ())], self.h.store.batches
        )

    def test_latency(self) -> None:
        """Commit latency runs from handing the batch to the database thread
        to the results being back."""
        thread = HeldThread()
        self.patch(self.h.store, "_thread", thread)
        self.alice.send(P.MsgR(1, self.bob_uid, "hi"))
        self.h.reactor.advance(0.004)
        thread.release()
        values = self.scrape()
        bucket = "im58d_commit_latency_seconds_bucket"
        le_002 = values[(bucket, (("le", "0.002"),))]
        le_005 = values[(bucket, (("le", "0.005"),))]
        self.assertEqual(le_005 - le_002, 1)
        self.assertAlmostEqual(self.metrics.recent_latency[-1], 0.004, places=5)
        self.assertEqual(self.metrics.recent_size[-1], 1)

    def test_batch_size(self) -> None:
        """A message batch counts its messages and acks; any other operation one."""
        batch = [
            (deliver_txn, ([(1, 1, 1, 2, "a", 1), (1, 1, 2, 2, "b", 1)], [(2, 2, 1)], 0, False),
             None, True),
            (len, ("x",), None, False),
        ]
        self.assertEqual(batch_size(batch), 4)

    def test_percentile(self) -> None:
        """Nearest-rank percentiles of the recent commits."""
        values = [float(n) for n in range(1, 101)]
        self.assertEqual(percentile(values, 0.5), 50)
        self.assertEqual(percentile(values, 0.99), 99)
        self.assertEqual(percentile([3.0], 0.99), 3)

    def test_observer_errors_never_stick_a_commit(self) -> None:
        """A failing observation is logged; the commit's results still go out."""
        self.patch(self.metrics, "commit_size", None)
        self.alice.send(P.MsgR(1, self.bob_uid, "hi"))
        self.assertEqual(self.alice.received(), [P.MsgA(1, 1, 1)])
        self.assertTrue(self.flushLoggedErrors(AttributeError))


class RateTests(MetricsTestCase):
    def test_messages_per_minute(self) -> None:
        """Messages per minute come from the samples of the last minute."""
        self.h.reactor.advance(30)
        self.metrics.sample()
        for cmid in range(1, 4):
            self.alice.send(P.MsgR(cmid, self.bob_uid, "hi"))
        self.h.reactor.advance(15)
        rate = self.metrics.summary()["per_minute"]
        # 3 messages in the 45 s since the first sample
        self.assertEqual(rate, {"in": 4.0, "out": 4.0, "window_s": 45.0})
        for _ in range(6):
            self.h.reactor.advance(10)
            self.metrics.sample()
        self.assertEqual(self.metrics.summary()["per_minute"]["in"], 0)
        history = self.metrics.summary()["history"]
        self.assertEqual(history[1]["in"], 7.2)  # 3 messages between samples 25 s apart
        self.assertEqual(len(history), 7)


class AuthTests(MetricsTestCase):
    def test_loopback_needs_no_token(self) -> None:
        """A scraper on the host (loopback) needs no token."""
        code, body = render(self.site, b"/metrics", "127.0.0.1")
        self.assertEqual(code, 200)
        self.assertIn(b"im58d_connections 2.0", body)
        code, body = render(self.site, b"/metrics", "::1")
        self.assertEqual(code, 200)

    def test_remote_without_token(self) -> None:
        """From another host: 401 without a token."""
        code, body = render(self.site, b"/metrics", "10.1.2.3")
        self.assertEqual(code, 401)
        self.assertEqual(json.loads(body)["error"]["code"], "unauthorized")

    def test_remote_wrong_token(self) -> None:
        """From another host: 403 with a wrong token, or a user's token."""
        for token in ("nope", self.alice_token):
            code, body = render(self.site, b"/metrics", "10.1.2.3", token)
            self.assertEqual(code, 403)
            self.assertEqual(json.loads(body)["error"]["code"], "forbidden")

    def test_remote_admin_token(self) -> None:
        """From another host with the admin token: the metrics."""
        code, body = render(self.site, b"/metrics", "10.1.2.3", TOKEN)
        self.assertEqual(code, 200)
        self.assertIn(b"im58d_sessions{state=\"online\"} 2.0", body)

    def test_nothing_below(self) -> None:
        """/metrics/anything is a JSON 404."""
        code, _, body = self.get("/metrics/x")
        self.assertEqual(code, 404)


class NoTokenTests(MetricsTestCase):
    admin_token = ""

    def test_off_for_remote_clients(self) -> None:
        """Without an admin token configured, only loopback scrapers get metrics."""
        code, body = render(self.site, b"/metrics", "10.1.2.3", "anything")
        self.assertEqual(code, 403)
        code, body = render(self.site, b"/metrics", "127.0.0.1")
        self.assertEqual(code, 200)
