"""Report mode: the HTTP bytes of reporting click events, one GET per event
(the talk's naive way) against the SDK's merged batches."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient

from ..client.report import Reporter, ReportState
from ..store.sqlite import open_database
from .common import PASSWORD, Daemon, device_id_b64
from .httpmeter import Session, WireMeter, metered_agent

_PAGES = ("home_page", "message_list", "chat_window", "friend_profile")
_BUTTONS = ("button_A", "button_send", "button_back", "button_search", "button_more")


def click_events(count: int) -> list[tuple[str, str]]:
    """``count`` clicks as (page, button), the same every run (a fixed seed):
    20 distinct kinds, some far more frequent than others."""
    rng = random.Random(58)
    kinds = [(page, button) for page in _PAGES for button in _BUTTONS]
    weights = [1 / (n + 1) for n in range(len(kinds))]
    return rng.choices(kinds, weights, k=count)


async def report_costs(reactor: Any, http_port: int, events: int = 1000, database: str = ""
                       ) -> dict[str, dict[str, Any]]:
    """The requests and bytes on the wire (both ways, HTTP headers included,
    over a real loopback socket) of ``events`` click events reported the
    naive way of the talk (one ``GET /report/up?uid=..&action=click&...``
    per event; the daemon answers 404, the bytes count all the same) and
    merged by the SDK's ``Reporter``: in batches of Y = 100 events and in
    one batch, as JSON and MessagePack, plain and gzipped.  With
    ``database``, checks that the daemon counted every merged click."""
    url = f"http://127.0.0.1:{http_port}"
    meter = WireMeter()
    # no Accept-Encoding: the answers are 204s and 404s, and curl sends none
    agent, pool = metered_agent(reactor, meter, gzip=False)
    http = HTTPClient(agent)
    response = await http.post(url + "/v1/login", json={
        "user": "bench0", "password": PASSWORD, "device_id": device_id_b64("bench0")})
    me = json.loads(await response.content())
    clicks = click_events(events)
    costs: dict[str, dict[str, Any]] = {}

    async def measure(name: str, step: Callable[[], Any]) -> None:
        before = meter.snapshot()
        t0 = time.perf_counter()
        await step()
        elapsed = time.perf_counter() - t0
        requests, up, down = (b - a for a, b in zip(before, meter.snapshot(), strict=True))
        costs[name] = {"requests": requests, "bytes_up": up, "bytes_down": down,
                       "bytes": up + down, "bytes_per_event": round((up + down) / events, 1),
                       "ms": round(elapsed * 1000, 1)}

    async def naive() -> None:
        for n, (page, button) in enumerate(clicks):
            response = await http.get(
                f"{url}/report/up?uid={me['uid']}&action=click&page={page}"
                f"&button={button}&ts={int(time.time()) + n // 10}")
            await response.content()

    session = Session(http, url, me["token"], me["uid"])

    def merged(every: int, encoding: str, gzip_from: int | None) -> Callable[[], Any]:
        async def step() -> None:
            reporter = Reporter(reactor, ReportState(), every_minutes=60, every_events=every,
                                encoding=encoding, gzip_from=gzip_from, session=session)
            for page, button in clicks:
                reporter.record(f"click.{page}.{button}")
            await reporter.flush()
            if reporter.pending or reporter.dropped:
                raise SystemExit(f"im58d-bench: reports not taken: {reporter.pending}")
        return step

    await measure("naive_get_per_event", naive)
    runs = 0
    for every, label in ((100, "y100"), (events, "one_batch")):
        for encoding in ("json", "msgpack"):
            for gzip_from, packing in ((None, "plain"), (1, "gzip")):
                await measure(f"merged_{label}_{encoding}_{packing}",
                              merged(every, encoding, gzip_from))
                runs += 1
    await pool.closeCachedConnections()
    if database:
        db = open_database(database)
        try:
            (total,) = db.execute("SELECT coalesce(sum(count), 0) FROM report_counts").fetchone()
        finally:
            db.conn.close()
        if total != runs * events:
            raise SystemExit(f"im58d-bench: the daemon counted {total} clicks, "
                             f"not {runs * events}")
    return costs


async def report_mode(reactor: Any, keep: bool = False, config: str | None = None,
                      events: int = 1000) -> dict[str, dict[str, Any]]:
    """``report_costs`` on a daemon of the bench's own."""
    daemon = Daemon(1, keep, config)
    try:
        return await report_costs(reactor, daemon.http_port, events, daemon.database)
    finally:
        daemon.close()
