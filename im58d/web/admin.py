"""For operators: ``GET /metrics`` (Prometheus) and the admin page.

The admin page (``GET /admin``) is one self-contained HTML document: its
script, style and charts (SVG drawn by the script) are inline, and its
Content-Security-Policy lets it load nothing but its own JSON from the
daemon.  A browser cannot send a bearer header when it navigates, so the
page itself holds no data and needs no token; the operator opens
``/admin#token=ADMIN_TOKEN``.  The fragment never leaves the browser (it is
not sent, so not logged); the script moves it to the tab's
``sessionStorage``, clears it from the address bar and calls the JSON
endpoints below ``/admin/api/`` with ``Authorization: Bearer``.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from ..store.interfaces import IStore
from .resource import (
    AdminResource,
    HTTPError,
    NotFound,
    Routed,
    error_body,
    query_int,
    respond,
)

DEFAULT_DAYS = 14
MAX_DAYS = 366
DEFAULT_KEYS = 8
MAX_KEYS = 50


class Figures(Protocol):
    """What the daemon's ``Metrics`` offers these resources."""

    def exposition(self, accept: str = "") -> tuple[bytes, str]: ...

    def summary(self) -> dict[str, Any]: ...


class MetricsResource(AdminResource):
    """``GET /metrics``: Prometheus text format (OpenMetrics when the scraper
    asks for it).  Loopback clients need no token: a scraper on the host."""

    local_ok = True

    def __init__(self, admin_token: str, metrics: Figures) -> None:
        super().__init__(admin_token)
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = self.metrics.exposition(accept)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        request.setHeader(b"cache-control", b"no-store")
        return body


class AdminAPI(AdminResource, Routed):
    """The admin page's JSON, behind the admin token:

    ``GET /admin/api/summary``: the live figures (sessions, connections,
    messages per minute, commit latency, ...), from memory.

    ``GET /admin/api/keys?days=D&limit=N``: the N report keys with the
    biggest counts over the last D days, each with its count and distinct
    users per day (``GET /v1/stats`` for each, in one answer).
    """

    routes = (
        (("summary",), "summary"),
        (("keys",), "keys"),
    )

    def __init__(self, admin_token: str, metrics: Figures, store: IStore, clock: Any) -> None:
        super().__init__(admin_token)
        self.metrics = metrics
        self.store = store
        self.clock = clock

    def summary_GET(self, request: Request) -> bytes:
        return respond(request, self.metrics.summary())

    def keys_GET(self, request: Request) -> Deferred[bytes]:
        days = query_int(request, "days", DEFAULT_DAYS, 1, MAX_DAYS)
        limit = query_int(request, "limit", DEFAULT_KEYS, 1, MAX_KEYS)
        now = int(self.clock.seconds())

        def with_days(top: list[dict[str, Any]]) -> Deferred[bytes]:
            # every key's days queued in this turn: one transaction
            d = gatherResults(
                [self.store.stats(row["key"], days, now) for row in top], consumeErrors=True
            )
            d.addErrback(_first_error)
            return d.addCallback(lambda series: respond(request, {
                "days": days,
                "keys": [{**row, "days": rows} for row, rows in zip(top, series, strict=True)],
            }))

        return self.store.top_keys(days, limit, now).addCallback(with_days)


def _first_error(failure: Failure) -> Failure:
    """The failure inside gatherResults' FirstError."""
    inner: Failure = failure.value.subFailure  # type: ignore[union-attr]
    return inner


class AdminPage(Resource):
    """``GET /admin``: the page; its JSON is at ``/admin/api/``."""

    def __init__(self, admin_token: str, api: AdminAPI) -> None:
        super().__init__()
        self.admin_token = admin_token
        self.putChild(b"api", api)

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self  # /admin/
        return NotFound()

    def render(self, request: Request) -> bytes:
        if not self.admin_token:
            return error_body(
                request, HTTPError(403, "forbidden", "admin endpoints are off: set [admin] token")
            )
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return error_body(
                request, HTTPError(405, "method_not_allowed", "GET is the only method here")
            )
        for name, value in PAGE_HEADERS:
            request.setHeader(name, value)
        return PAGE


def mount(root: Resource, metrics: Figures, store: IStore, clock: Any, admin_token: str) -> None:
    """Put ``/metrics`` and ``/admin`` into the tree."""
    root.putChild(b"metrics", MetricsResource(admin_token, metrics))
    root.putChild(b"admin", AdminPage(admin_token, AdminAPI(admin_token, metrics, store, clock)))


STYLE = """
:root { color-scheme: light dark; --fg: #1d2430; --muted: #5d6778; --line: #d5dae3;
  --tile: #f4f6f9; --count: #3f73c9; --users: #d9731c; --bad: #b3261e; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e4e8ef; --muted: #9aa4b5; --line: #3a4150; --tile: #1f2430;
    --count: #6f9be6; --users: #f0a255; --bad: #ff8a80; } }
body { font: 15px/1.4 system-ui, sans-serif; color: var(--fg); margin: 0 auto;
  max-width: 72rem; padding: 1rem 1.5rem 3rem; }
header { display: flex; align-items: baseline; gap: 1rem; flex-wrap: wrap; }
h1 { font-size: 1.4rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .6rem; }
#status { color: var(--muted); }
#status[data-state=error] { color: var(--bad); font-weight: 600; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(11rem, 1fr));
  gap: .6rem; margin: 0; }
.tiles div { background: var(--tile); border-radius: .5rem; padding: .6rem .8rem; }
.tiles dt { color: var(--muted); font-size: .85rem; }
.tiles dd { margin: .2rem 0 0; font-size: 1.5rem; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .25rem .9rem .25rem 0; text-align: right; border-bottom: 1px solid var(--line); }
th:first-child, td:first-child { text-align: left; }
#charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(26rem, 1fr));
  gap: 1rem; }
figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: .2rem; overflow-wrap: anywhere; }
figcaption small { color: var(--muted); font-weight: normal; }
svg { width: 100%; height: auto; display: block; }
svg text { fill: var(--muted); font-size: 11px; }
.axis { stroke: var(--line); }
.bar { fill: var(--count); }
.users-line, .in-line { fill: none; stroke: var(--users); stroke-width: 2; }
.out-line { fill: none; stroke: var(--count); stroke-width: 2; }
.point { fill: var(--users); }
.legend-count { color: var(--count); }
.legend-users { color: var(--users); }
.note { color: var(--muted); }
"""

SCRIPT = r"""
"use strict";
(() => {
  const STORAGE = "im58d.admin.token";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  // The token comes in the fragment, which no request carries; it moves to
  // this tab's storage and out of the address bar and the history.
  let token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  if (token) {
    try { sessionStorage.setItem(STORAGE, token); } catch (e) { /* storage off */ }
    history.replaceState(null, "", location.pathname + location.search);
  } else {
    try { token = sessionStorage.getItem(STORAGE) || ""; } catch (e) { token = ""; }
  }
  const query = new URLSearchParams(location.search);
  const days = Math.min(366, Math.max(1, parseInt(query.get("days") || "14", 10) || 14));
  const api = location.pathname.replace(/\/+$/, "") + "/api/";

  function setStatus(state, text) {
    const node = $("status");
    node.dataset.state = state;
    node.textContent = text;
  }

  class Refused extends Error {}

  async function get(path) {
    const response = await fetch(api + path, {
      headers: { "Authorization": "Bearer " + token },
      cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
    });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const message = body && body.error ? body.error.message : "HTTP " + response.status;
      throw response.status === 401 || response.status === 403
        ? new Refused(message) : new Error(message);
    }
    return body;
  }

  function text(value, digits) {
    if (value === null || value === undefined) return "–";
    return digits === undefined ? String(value) : value.toFixed(digits);
  }

  function show(id, value, shown) {
    const node = $(id);
    node.dataset.value = value === null || value === undefined ? "" : String(value);
    node.textContent = shown === undefined ? text(value) : shown;
  }

  function duration(seconds) {
    const s = Math.floor(seconds), d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
    const m = Math.floor(s % 3600 / 60);
    return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m + "m " + (s % 60) + "s";
  }

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    if (parent) parent.appendChild(node);
    return node;
  }

  function label(parent, x, y, content, anchor, cls) {
    const node = el("text", { x: x, y: y, "text-anchor": anchor, class: cls || "" }, parent);
    node.textContent = String(content);
    return node;
  }

  const r1 = (v) => Math.round(v * 10) / 10;
  const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");

  function showSummary(s) {
    show("sessions-online", s.sessions.online);
    show("sessions-lingering", s.sessions.lingering);
    show("connections", s.connections);
    show("messages-in-per-minute", s.per_minute.in, text(s.per_minute.in, 1));
    show("messages-out-per-minute", s.per_minute.out, text(s.per_minute.out, 1));
    const latency = s.commits.latency_ms;
    show("commit-p50", latency && latency.p50, latency ? text(latency.p50, 2) + " ms" : "–");
    show("commit-p99", latency && latency.p99, latency ? text(latency.p99, 2) + " ms" : "–");
    show("commit-size", s.commits.size && s.commits.size.mean);
    show("commits", s.commits.count);
    show("messages-in", s.messages.in);
    show("messages-out", s.messages.out);
    show("dedup-hits", s.messages.duplicates);
    show("retransmits", s.messages.retransmits);
    show("acks-in", s.messages.acks_in);
    show("acks-out", s.messages.acks_out);
    show("report-batches", s.report_batches);
    show("uptime", s.uptime_s, duration(s.uptime_s));
    $("version").textContent = s.version;
    drawRates(s.history);
  }

  function drawRates(history) {
    const W = 960, H = 120, L = 48, R = 12, T = 10, B = 18;
    const root = $("rate-chart");
    root.replaceChildren();
    root.dataset.points = history.length;
    if (history.length < 2) {
      label(root, W / 2, H / 2, "collecting (a point every 10 s)", "middle", "note");
      return;
    }
    const top = Math.max(1, ...history.map((p) => Math.max(p.in, p.out)));
    const x0 = history[0].t, span = Math.max(1, history[history.length - 1].t - x0);
    const x = (p) => r1(L + (p.t - x0) / span * (W - L - R));
    const y = (v) => r1(T + (H - T - B) * (1 - v / top));
    el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }, root);
    label(root, L - 6, T + 8, r1(top), "end");
    label(root, L - 6, H - B, 0, "end");
    label(root, W - R, H - 4, "now", "end");
    label(root, L, H - 4, span < 120 ? "-" + Math.round(span) + " s"
      : "-" + Math.round(span / 60) + " min", "start");
    for (const side of ["in", "out"]) {
      el("polyline", {
        points: history.map((p) => x(p) + "," + y(p[side])).join(" "),
        class: side + "-line", "data-series": side,
      }, root);
    }
  }

  function drawKey(key) {
    const W = 640, H = 190, L = 48, R = 48, T = 14, B = 30;
    const series = key.days, n = series.length;
    const maxCount = Math.max(1, ...series.map((d) => d.count));
    const maxUsers = Math.max(1, ...series.map((d) => d.users));
    const plotW = W - L - R, plotH = H - T - B, step = plotW / n, base = T + plotH;

    const figure = document.createElement("figure");
    figure.dataset.key = key.key;
    const caption = document.createElement("figcaption");
    caption.textContent = key.key + " ";
    const small = document.createElement("small");
    small.textContent = plural(key.count, "time") + " by " + plural(key.users, "user");
    caption.appendChild(small);
    figure.appendChild(caption);

    const root = el("svg", {
      viewBox: "0 0 " + W + " " + H, role: "img", class: "key-chart",
      "data-key": key.key, "data-days": n,
      "aria-label": key.key + ": count (bars) and distinct users (line) per day",
    });
    el("line", { x1: L, y1: base, x2: L + plotW, y2: base, class: "axis" }, root);
    label(root, L - 6, T + 8, maxCount, "end", "legend-count");
    label(root, L - 6, base, 0, "end");
    label(root, L + plotW + 6, T + 8, maxUsers, "start", "legend-users");
    label(root, L + plotW + 6, base, 0, "start");
    const bars = el("g", { class: "counts" }, root);
    const points = [];
    series.forEach((d, i) => {
      const h = d.count / maxCount * plotH;
      const bar = el("rect", {
        x: r1(L + i * step + step * 0.15), y: r1(base - h), width: r1(step * 0.7), height: r1(h),
        class: "bar", "data-day": d.day, "data-count": d.count, "data-users": d.users,
      }, bars);
      el("title", {}, bar).textContent =
        d.day + ": " + plural(d.count, "time") + ", " + plural(d.users, "user");
      points.push([r1(L + (i + 0.5) * step), r1(base - d.users / maxUsers * plotH)]);
    });
    el("polyline", { points: points.map((p) => p.join(",")).join(" "), class: "users-line" }, root);
    const dots = el("g", { class: "users" }, root);
    series.forEach((d, i) => {
      el("circle", {
        cx: points[i][0], cy: points[i][1], r: 3, class: "point",
        "data-day": d.day, "data-users": d.users, "data-count": d.count,
      }, dots);
    });
    const marks = n > 1 ? [0, Math.floor((n - 1) / 2), n - 1] : [0];
    for (const i of new Set(marks)) {
      label(root, r1(L + (i + 0.5) * step), H - 10, series[i].day.slice(5), "middle");
    }
    figure.appendChild(root);
    return figure;
  }

  function showKeys(answer) {
    $("days").textContent = answer.days;
    const body = $("top-keys").tBodies[0];
    body.replaceChildren();
    const charts = $("charts");
    charts.replaceChildren();
    if (!answer.keys.length) {
      const cell = body.insertRow().insertCell();
      cell.colSpan = 3;
      cell.className = "note";
      cell.textContent = "no client reports in these days";
      return;
    }
    for (const key of answer.keys) {
      const row = body.insertRow();
      row.dataset.key = key.key;
      row.dataset.count = key.count;
      row.dataset.users = key.users;
      for (const value of [key.key, key.count, key.users]) {
        row.insertCell().textContent = String(value);
      }
      charts.appendChild(drawKey(key));
    }
  }

  let stopped = false;

  async function poll(load, every) {
    while (!stopped) {
      try {
        await load();
        setStatus("ok", "updated " + new Date().toLocaleTimeString());
      } catch (e) {
        setStatus("error", e.message);
        if (e instanceof Refused) { stopped = true; return; }
      }
      await new Promise((resolve) => setTimeout(resolve, every));
    }
  }

  if (!token) {
    setStatus("error", "no admin token: open this page as /admin#token=ADMIN_TOKEN");
    return;
  }
  poll(async () => showSummary(await get("summary")), 5000);
  poll(async () => showKeys(await get("keys?days=" + days)), 60000);
})();
"""

BODY = """<header><h1>im58d</h1><span id="version"></span>
<span id="status" data-state="loading">loading…</span></header>
<main>
<section id="live"><h2>Now</h2>
<dl class="tiles">
<div><dt>Sessions online</dt><dd id="sessions-online">–</dd></div>
<div><dt>Sessions lingering</dt><dd id="sessions-lingering">–</dd></div>
<div><dt>Connections</dt><dd id="connections">–</dd></div>
<div><dt>Messages in / min</dt><dd id="messages-in-per-minute">–</dd></div>
<div><dt>Messages out / min</dt><dd id="messages-out-per-minute">–</dd></div>
<div><dt>Commit latency p50</dt><dd id="commit-p50">–</dd></div>
<div><dt>Commit latency p99</dt><dd id="commit-p99">–</dd></div>
<div><dt>Writes per commit</dt><dd id="commit-size">–</dd></div>
</dl>
<h2>Messages per minute <small class="legend-users">in</small>
<small class="legend-count">out</small></h2>
<svg id="rate-chart" viewBox="0 0 960 120" role="img"
 aria-label="messages in and out per minute, last ten minutes"></svg>
<h2>Since the start</h2>
<dl class="tiles">
<div><dt>Messages in</dt><dd id="messages-in">–</dd></div>
<div><dt>Messages out</dt><dd id="messages-out">–</dd></div>
<div><dt>De-dup hits</dt><dd id="dedup-hits">–</dd></div>
<div><dt>Retransmits</dt><dd id="retransmits">–</dd></div>
<div><dt>Acks in</dt><dd id="acks-in">–</dd></div>
<div><dt>Acks out</dt><dd id="acks-out">–</dd></div>
<div><dt>Commits</dt><dd id="commits">–</dd></div>
<div><dt>Report batches</dt><dd id="report-batches">–</dd></div>
<div><dt>Uptime</dt><dd id="uptime">–</dd></div>
</dl>
</section>
<section id="reports"><h2>Client reports, last <span id="days">–</span> days</h2>
<p class="note">Per key: <span class="legend-count">■ count</span> and
<span class="legend-users">● distinct users</span> per UTC day.</p>
<table id="top-keys"><thead><tr><th>key</th><th>count</th><th>users</th></tr></thead>
<tbody></tbody></table>
<div id="charts"></div>
</section>
</main>
"""


def _sha256(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


PAGE = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<meta name="referrer" content="no-referrer">\n'
    "<title>im58d admin</title>\n"
    f"<style>{STYLE}</style></head>\n<body>\n{BODY}<script>{SCRIPT}</script>\n</body></html>\n"
).encode()

# Nothing but the page's own script and style, and its own JSON.
CSP = (
    f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE_HEADERS = (
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", CSP.encode("ascii")),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
)
