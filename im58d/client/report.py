"""Client log reports the way the talk's section 四 (优化上报日志) has them.

Instead of one ``GET /report/up?uid=...&action=click&key1=...`` per event,
the app calls ``Reporter.record(key)`` and the reporter merges the events
into a count per key (the "combiner" of map-reduce: 1,000 clicks on one
button are one key and the number 1000), then sends the batch with
``POST /v1/report`` (PROTOCOL.md section 3) in MessagePack, gzipped when
that is smaller:

- when the app opens (the first login of ``Client.start``) or exits
  (``Client.stop``, before BYE);
- X minutes (``every_minutes``) after the first event of a batch, so an
  event waits at most that long and an idle app never wakes up for it;
- after Y events (``every_events``), or when the batch is full (1,000 keys,
  a million of one key, or about 60 KB of keys: the server's limits);

whichever comes first.  A batch is cut once and keeps its id until the
server has it: batches waiting to be sent are written to a state file of
their own (``ReportFile``) and sent again after a restart, with the same
id, so the server counts each once.  Failures back off (``min_backoff`` to
``max_backoff``, with jitter); 401 waits for the next login; a 4xx other
than 401, 408 and 429 drops the batch with a log line, since sending it
again cannot help.  Batches older than ``max_age`` are dropped too.

Events not yet cut into a batch live in memory only: a crash loses them,
a clean exit does not.
"""

from __future__ import annotations

import gzip
import json
import random
import secrets
from typing import Any

import msgpack
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from .state import write_json

log = Logger()

# the server's limits (im58d.web.report)
MAX_KEYS = 1000
MAX_KEY_BYTES = 128
MAX_COUNT = 1_000_000
MAX_WIRE = 64 * 1024
# keys of one batch, in bytes as encoded: room for "id" and "t" under MAX_WIRE
# even without gzip
MAX_KEYS_BYTES = 60 * 1024
# a batch not delivered within a week is dropped (the server remembers batch
# ids for 30 days, so a late retry is still counted once)
MAX_AGE = 7 * 86400
MAX_PENDING = 100
ENCODINGS = ("msgpack", "json")


def check_key(key: str) -> bytes:
    """A key's UTF-8; ValueError for what the server would refuse."""
    if not isinstance(key, str) or not key:
        raise ValueError("a report key is a non-empty string")
    data = key.encode("utf-8")
    if len(data) > MAX_KEY_BYTES:
        raise ValueError(f"report key over {MAX_KEY_BYTES} bytes: {key[:40]!r}...")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in key):
        raise ValueError(f"report key with a control character: {key!r}")
    return data


def encode_batch(
    batch: dict[str, Any], encoding: str = "msgpack", gzip_from: int | None = 256
) -> tuple[bytes, dict[str, str]]:
    """The body and content headers of a batch: MessagePack or JSON, gzipped
    when it is ``gzip_from`` bytes or more (None: never)."""
    body = {"id": batch["id"], "t": batch["t"], "k": batch["k"], "c": batch["c"]}
    if encoding == "msgpack":
        data: bytes = msgpack.packb(body)
        headers = {"Content-Type": "application/msgpack"}
    elif encoding == "json":
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
    else:
        raise ValueError(f"unknown report encoding {encoding!r}")
    if gzip_from is not None and len(data) >= gzip_from:
        data = gzip.compress(data, 6, mtime=0)
        headers["Content-Encoding"] = "gzip"
    return data, headers


class ReportState:
    """The reporter's durable facts, in memory: the device's id for batch
    ids, the next batch number and the batches not yet delivered."""

    def __init__(self) -> None:
        # batch ids are "<device>-<n>": a fresh device id whenever the
        # counter is lost, so ids never repeat on a device
        self.device = secrets.token_hex(8)
        self.next_batch = 1
        # {"id", "t": [first, last], "k": [...], "c": [...], "created"}
        self.pending: list[dict[str, Any]] = []

    def take_id(self) -> str:
        n = self.next_batch
        self.next_batch += 1
        return f"{self.device}-{n}"

    def save(self) -> None:
        """Make the state durable (nothing to do in memory)."""


class ReportFile(ReportState):
    """``ReportState`` in a JSON file of its own, rewritten atomically."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                data: dict[str, Any] = json.load(f)
            device, next_batch = str(data["device"]), int(data["next_batch"])
            pending = [dict(b) for b in data["pending"]]
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError) as e:
            # a fresh device id keeps the new batch ids apart from the old
            log.warn("report state {path} unreadable ({e}); starting afresh", path=path, e=e)
            return
        self.device, self.next_batch, self.pending = device, next_batch, pending

    def save(self) -> None:
        data = {"device": self.device, "next_batch": self.next_batch, "pending": self.pending}
        write_json(self.path, data)


class Reporter:
    """Merges an app's events into counts per key and sends them in batches.

    ``session`` is anything with ``http`` (treq-like ``post``), ``http_url``
    and ``token``: ``Client(reporter=...)`` attaches itself, tells the
    reporter of each login and lets it send before BYE on ``stop``.
    """

    def __init__(
        self,
        clock: Any,
        state: ReportState | None = None,
        every_minutes: float = 5.0,
        every_events: int = 100,
        encoding: str = "msgpack",
        gzip_from: int | None = 256,
        min_backoff: float = 5.0,
        max_backoff: float = 600.0,
        max_age: float = MAX_AGE,
        max_pending: int = MAX_PENDING,
        exit_timeout: float = 5.0,
        session: Any = None,
    ) -> None:
        if every_minutes <= 0 or every_events < 1:
            raise ValueError("every_minutes and every_events must be positive")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}")
        self.clock = clock
        self.state = state if state is not None else ReportState()
        self.every = every_minutes * 60
        self.every_events = every_events
        self.encoding = encoding
        self.gzip_from = gzip_from
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_age = max_age
        self.max_pending = max_pending
        self.exit_timeout = exit_timeout
        self.session = session
        # the batch being merged
        self._counts: dict[str, int] = {}
        self._events = 0
        self._bytes = 0
        self._first = 0
        self._last = 0
        self._timer: Any = None  # X minutes after the batch's first event
        # sending
        self._retry: Any = None  # the backoff timer
        self._backoff = min_backoff
        self._sending = False
        self._again = False
        self._waiting: list[Deferred[None]] = []
        # counters
        self.sent = 0  # batches the server took (204)
        self.dropped = 0  # batches refused for good, expired or over max_pending
        self.requests = 0  # POSTs made

    def attach(self, session: Any) -> None:
        self.session = session

    # -- the app's side --------------------------------------------------------

    def record(self, key: str, n: int = 1) -> None:
        """``n`` events of ``key`` (``"click.buttonA"``); merged with the
        batch's earlier events of that key."""
        size = len(json.dumps(check_key(key).decode("utf-8"), ensure_ascii=False)) + 8
        if type(n) is not int or not 1 <= n <= MAX_COUNT:
            raise ValueError(f"n must be a whole number in 1..{MAX_COUNT}")
        held = self._counts.get(key)
        if held is None and (len(self._counts) >= MAX_KEYS
                             or self._bytes + size > MAX_KEYS_BYTES):
            self._cut_and_send()  # the batch is full
        elif held is not None and held + n > MAX_COUNT:
            self._cut_and_send()
        now = int(self.clock.seconds())
        if not self._counts:
            self._first = now
            self._timer = self.clock.callLater(self.every, self._minutes_passed)
        if key not in self._counts:
            self._bytes += size
        self._counts[key] = self._counts.get(key, 0) + n
        self._last = now
        self._events += n
        if self._events >= self.every_events:
            self._cut_and_send()

    def flush(self) -> Deferred[None]:
        """Cut the batch being merged and send every waiting batch now;
        fires when there is nothing left to send or sending has to wait
        (not logged in, a failure backing off).  Never fails."""
        self._cut()
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        self._kick(force=True)
        return d

    def logged_in(self, first: bool) -> None:
        """A login (WELCOME or RESUMED); ``first``: the app has just opened,
        so the batch being merged goes too."""
        if first:
            self._cut()
        self._kick(force=True)

    def exited(self) -> Deferred[None]:
        """The app exits: cut the batch, send what waits for at most
        ``exit_timeout`` seconds, stop the timers; what is left stays in the
        state for the next run.  Never fails."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        d = self.flush()
        d.addTimeout(self.exit_timeout, self.clock)
        d.addErrback(_timed_out)
        d.addCallback(lambda _: self._stop_timers())
        return d

    @property
    def pending(self) -> list[dict[str, Any]]:
        """The batches cut and not yet delivered, oldest first."""
        return self.state.pending

    @property
    def merging(self) -> dict[str, int]:
        """The events of the batch not yet cut: ``{key: count}``."""
        return dict(self._counts)

    # -- batches ---------------------------------------------------------------

    def _minutes_passed(self) -> None:
        self._timer = None
        self._cut_and_send()

    def _cut_and_send(self) -> None:
        self._cut()
        self._kick(force=False)

    def _cut(self) -> None:
        """Close the batch being merged: give it an id and keep it."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._counts:
            return
        state = self.state
        state.pending.append({
            "id": state.take_id(),
            "t": [self._first, self._last],
            "k": list(self._counts),
            "c": list(self._counts.values()),
            "created": int(self.clock.seconds()),
        })
        self._counts = {}
        self._events = 0
        self._bytes = 0
        while len(state.pending) > self.max_pending:
            old = state.pending.pop(0)
            self.dropped += 1
            log.warn("report batch {id} dropped: over {n} batches wait",
                     id=old["id"], n=self.max_pending)
        state.save()

    def _remove(self, batch: dict[str, Any]) -> None:
        self.state.pending = [b for b in self.state.pending if b is not batch]
        self.state.save()

    def _expire(self) -> None:
        oldest = self.clock.seconds() - self.max_age
        for batch in [b for b in self.state.pending if b["created"] < oldest]:
            self.dropped += 1
            log.warn("report batch {id} dropped: not delivered in {days:g} days",
                     id=batch["id"], days=self.max_age / 86400)
            self._remove(batch)

    # -- sending ---------------------------------------------------------------

    def _kick(self, force: bool) -> None:
        """Start sending; while backing off only when ``force``d (a login,
        an exit, the app asking)."""
        if force:
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._retry = None
            self._backoff = self.min_backoff
            if self._sending:
                self._again = True
        if self._sending or (self._retry is not None and self._retry.active()):
            return
        self._sending = True
        self._round().addBoth(self._round_done)

    def _round_done(self, result: object) -> None:
        self._sending = False
        if isinstance(result, Failure):
            log.failure("sending reports failed", result)
        if self._again:
            self._again = False
            self._kick(force=True)
            return
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    @inlineCallbacks
    def _round(self) -> Any:
        """Send the waiting batches one at a time, oldest first."""
        while True:
            self._expire()
            session = self.session
            if not self.state.pending or session is None or session.token is None:
                return
            batch = self.state.pending[0]
            try:
                code = yield self._post(session, batch)
            except Exception as e:
                log.info("report batch {id} not sent ({e}); trying again later",
                         id=batch["id"], e=e)
                self._later()
                return
            if 200 <= code < 300:
                self._remove(batch)
                self.sent += 1
                self._backoff = self.min_backoff
            elif code == 401:
                log.info("report batch {id}: 401, waiting for the next login", id=batch["id"])
                return
            elif code in (408, 429) or not 400 <= code < 500:
                log.info("report batch {id}: HTTP {code}; trying again later",
                         id=batch["id"], code=code)
                self._later()
                return
            else:
                log.warn("report batch {id} refused with HTTP {code}: dropped",
                         id=batch["id"], code=code)
                self._remove(batch)
                self.dropped += 1

    @inlineCallbacks
    def _post(self, session: Any, batch: dict[str, Any]) -> Any:
        data, headers = encode_batch(batch, self.encoding, self.gzip_from)
        headers["Authorization"] = f"Bearer {session.token}"
        self.requests += 1
        response = yield session.http.post(session.http_url + "/v1/report",
                                           data=data, headers=headers)
        yield response.content()
        return response.code

    def _later(self) -> None:
        delay = self._backoff * (0.5 + random.random())
        self._backoff = min(self._backoff * 2, self.max_backoff)
        self._retry = self.clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._kick(force=False)

    def _stop_timers(self) -> None:
        for call in (self._timer, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._retry = None


def _timed_out(failure: Failure) -> None:
    failure.trap(CancelledError, defer.TimeoutError)
