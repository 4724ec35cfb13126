"""The daemon's figures: Prometheus metrics for ``GET /metrics`` and the live
summary of the admin page.

Nothing here runs on the message path.  The counters are the plain integers
the Messenger, the access factory and the store keep anyway; a custom
collector reads them when a scraper asks.  The only things observed as they
happen are the store's commits, once per transaction (batch size and
latency histograms).  Each daemon has a registry of its own, not
prometheus-client's global one, so that tests stay apart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from . import __version__
from .store.inbox import deliver_txn

log = Logger()

# seconds between the samples behind "messages per minute" (a TimerService)
SAMPLE_INTERVAL = 10.0
# samples kept: ten minutes of history for the admin page
SAMPLES = 61
# commits whose latency and size the admin page's percentiles cover
RECENT_COMMITS = 1024

# messages and acks per commit: 1 at low rates, up to a few hundred under load
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# seconds from handing a batch to the database thread to its results being back
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)


def batch_size(batch: Sequence[tuple[Any, ...]]) -> int:
    """The writes of one store transaction: the messages and acks of each
    message batch (``deliver``), one for every other operation."""
    n = 0
    for op in batch:
        if op[0] is deliver_txn:
            args = op[1]
            n += len(args[0]) + len(args[1])
        else:
            n += 1
    return n


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of the sorted values lie (nearest rank)."""
    index = max(0, min(len(ordered) - 1, int(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


class Metrics:
    """The figures of one daemon.

    ``factory`` is the AccessFactory, ``messenger`` the Messenger, ``store``
    the SQLite store: their counters are read, never wrapped.  The store
    calls ``committed`` once per transaction (its ``on_batch`` hook).
    """

    def __init__(
        self,
        clock: IReactorTime,
        factory: Any,
        router: Any,
        messenger: Any,
        store: Any,
        process: bool = True,
    ) -> None:
        self.clock = clock
        self.factory = factory
        self.router = router
        self.messenger = messenger
        self.store = store
        self.started: float | None = None  # the first sample's time
        self.registry = CollectorRegistry()
        self.commit_size = Histogram(
            "im58d_commit_batch_size",
            "Writes per store transaction: messages and acks of the message "
            "batches, one for each other operation.",
            buckets=SIZE_BUCKETS,
            registry=self.registry,
        )
        self.commit_latency = Histogram(
            "im58d_commit_latency_seconds",
            "Seconds from handing a batch to the database thread until its "
            "transaction is committed and the results are back.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(DaemonCollector(self))
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        # the latest commits, for the admin page's percentiles
        self.recent_latency: deque[float] = deque(maxlen=RECENT_COMMITS)
        self.recent_size: deque[int] = deque(maxlen=RECENT_COMMITS)
        # (time, messages in, messages out) every SAMPLE_INTERVAL seconds
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=SAMPLES)
        store.on_batch = self.committed

    # observed as it happens: once per store transaction

    def committed(self, batch: Sequence[tuple[Any, ...]], seconds: float) -> None:
        try:
            size = batch_size(batch)
            self.commit_size.observe(size)
            self.commit_latency.observe(seconds)
            self.recent_size.append(size)
            self.recent_latency.append(seconds)
        except Exception:  # a figure is never worth a stuck commit
            log.failure("observing a commit")

    # read when asked

    def sample(self) -> None:
        """Note the message counters (a TimerService every SAMPLE_INTERVAL,
        the first time when the daemon starts)."""
        messenger = self.messenger
        now = self.clock.seconds()
        if self.started is None:
            self.started = now
        self.samples.append((now, messenger.received, messenger.pushed))

    def sessions(self) -> tuple[int, int]:
        """Devices online here with a live connection, and devices lingering
        without one."""
        total = len(self.router)
        online = sum(1 for d in self.router.devices() if d.connection is not None)
        return online, total - online

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the format the scraper accepts, and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def per_minute(self, now: float) -> dict[str, Any]:
        """Messages in and out per minute over the last minute (over the time
        since the start while the daemon is younger than that)."""
        messenger = self.messenger
        if not self.samples:
            return {"in": 0.0, "out": 0.0, "window_s": 0.0}
        since = now - 60.0
        base = self.samples[0]
        for sample in self.samples:
            if sample[0] >= since - 1e-6:
                base = sample
                break
        elapsed = now - base[0]
        if elapsed <= 0:
            return {"in": 0.0, "out": 0.0, "window_s": 0.0}
        scale = 60.0 / elapsed
        return {
            "in": round((messenger.received - base[1]) * scale, 1),
            "out": round((messenger.pushed - base[2]) * scale, 1),
            "window_s": round(elapsed, 1),
        }

    def history(self) -> list[dict[str, float]]:
        """Messages in and out per minute between consecutive samples."""
        out: list[dict[str, float]] = []
        previous = None
        for sample in self.samples:
            if previous is not None and sample[0] > previous[0]:
                scale = 60.0 / (sample[0] - previous[0])
                out.append({
                    "t": round(sample[0], 3),
                    "in": round((sample[1] - previous[1]) * scale, 1),
                    "out": round((sample[2] - previous[2]) * scale, 1),
                })
            previous = sample
        return out

    def commits(self) -> dict[str, Any]:
        latency = sorted(self.recent_latency)
        sizes = self.recent_size
        if not latency:
            return {"count": self.store.batches, "recent": 0, "latency_ms": None, "size": None}
        return {
            "count": self.store.batches,
            "recent": len(latency),
            "latency_ms": {
                "p50": round(percentile(latency, 0.5) * 1000, 3),
                "p99": round(percentile(latency, 0.99) * 1000, 3),
                "max": round(latency[-1] * 1000, 3),
            },
            "size": {"mean": round(sum(sizes) / len(sizes), 1), "max": max(sizes)},
        }

    def summary(self) -> dict[str, Any]:
        """The live figures of the admin page (``GET /admin/api/summary``)."""
        now = self.clock.seconds()
        messenger = self.messenger
        online, lingering = self.sessions()
        return {
            "version": __version__,
            "now": round(now, 3),
            "uptime_s": round(now - (self.started or now), 1),
            "connections": len(self.factory.connections),
            "sessions": {"online": online, "lingering": lingering},
            "messages": {
                "in": messenger.received,
                "out": messenger.pushed,
                "stored": messenger.stored,
                "duplicates": messenger.duplicates,
                "retransmits": messenger.retransmitted,
                "acks_in": messenger.acks,
                "acks_out": messenger.acks_out,
            },
            "per_minute": self.per_minute(now),
            "history": self.history(),
            "commits": self.commits(),
            "report_batches": self.store.report_batches,
        }


class DaemonCollector:
    """Reads the daemon's plain counters when the registry is collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        messenger = m.messenger
        store = m.store
        info = GaugeMetricFamily("im58d_info", "The daemon's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "im58d_connections", "Open access (TCP) connections.",
            value=len(m.factory.connections),
        )
        online, lingering = m.sessions()
        sessions = GaugeMetricFamily(
            "im58d_sessions",
            "Devices online here: with a connection (online), or lingering "
            "without one after it dropped.",
            labels=["state"],
        )
        sessions.add_metric(["online"], online)
        sessions.add_metric(["lingering"], lingering)
        yield sessions
        for name, text, value in (
            ("im58d_messages_in", "Messages received (MSG_R).", messenger.received),
            ("im58d_messages_out", "Messages pushed to online receivers (MSG_N, "
             "first sends).", messenger.pushed),
            ("im58d_messages_stored", "Messages stored (new, not duplicates).",
             messenger.stored),
            ("im58d_dedup_hits", "MSG_Rs that repeated a stored message (answered "
             "with its MSG_A, stored once).", messenger.duplicates),
            ("im58d_retransmits", "MSG_Ns sent again because their ack was late.",
             messenger.retransmitted),
            ("im58d_acks_in", "Acks received (ACK_R).", messenger.acks),
            ("im58d_acks_out", "Read receipts sent to senders (ACK_N).", messenger.acks_out),
            ("im58d_commits", "Store transactions committed (or failed).", store.batches),
            ("im58d_store_operations", "Store operations run in those transactions.",
             store.operations),
            ("im58d_report_batches", "Client log report batches counted "
             "(POST /v1/report).", store.report_batches),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield CounterMetricFamily(
            "im58d_caught_up", "MSG_Ns pushed from the store because a publication "
            "of another node did not arrive (several nodes).", value=messenger.caught_up,
        )
        router = m.router
        if getattr(router, "clustered", False):
            yield GaugeMetricFamily(
                "im58d_redis_up", "1 while this node is joined through Redis.",
                value=int(router.up),
            )
            yield GaugeMetricFamily(
                "im58d_cluster_nodes", "Live nodes in the registry at the last refresh.",
                value=router.live_nodes,
            )
            for name, text, value in (
                ("im58d_redis_published", "Publications to other nodes' channels.",
                 router.published),
                ("im58d_redis_received", "Publications received from other nodes.",
                 router.received),
                ("im58d_redis_outages", "Times the connection to Redis was lost.",
                 router.outages),
            ):
                yield CounterMetricFamily(name, text, value=value)
