"""The daemon's log: one line per event, as text or as JSON (``[log] format``),
and no secret in any line.

twistd sets up the log observer itself, after ``makeService`` and before the
reactor runs; ``use_for_twistd`` (called while the options are parsed) names
``twistd_observer`` as twistd's ``--logger``, so that twistd installs ours, on
the file it would have used: standard output with ``-n`` (the journal under
systemd), else ``--logfile`` (``twistd.log`` by default, rotated on SIGUSR1).
An operator's own ``--logger`` or ``--syslog`` is left alone.

Text lines look like twistd's own (``TIME [SYSTEM] TEXT``), with the
newlines of a traceback or of a client's string escaped as ``\\n``.  A JSON
line is an object: ``time`` (ISO 8601, UTC), ``level``, ``namespace``,
``system`` (when there is one), ``text`` (the formatted message), ``traceback``
(for a failure), and the event's fields that the message shows, when they are
plain values (``uid``, ``address``, ...); never fields the message leaves out.

Secrets: log calls name uids, devices and addresses, never a password, token,
session key or proof; the HTTP access log (``access_log_formatter``) drops a
request's fragment and the values of query parameters other than the
harmless ones, and includes no ``Authorization`` header.
"""

from __future__ import annotations

import json
import math
import re
import signal
import string
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from datetime import UTC, datetime
from functools import partial
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent, formatTime
from twisted.python.logfile import LogFile
from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import implementer, provider

FORMATS = ("text", "json")

# control characters (but tab) as escapes, so that no event spans two lines
# and no client string can forge a line
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), 127] if c != 9}
_ESCAPES.update({10: "\\n", 13: "\\r"})

_SCALARS = (str, int, float, bool, type(None))
_RESERVED = frozenset({"time", "level", "namespace", "system", "text", "traceback"})


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped."""
    return text.translate(_ESCAPES)


def _traceback(event: LogEvent) -> str:
    failure = event.get("log_failure")
    if failure is None:
        return ""
    try:
        return str(failure.getTraceback()).rstrip()
    except Exception:
        return "(the traceback could not be formatted)"


def event_text(event: LogEvent) -> str:
    """The event's message, followed by the traceback of its failure."""
    text = formatEvent(event)
    traceback = _traceback(event)
    if traceback and traceback not in text:  # a legacy log.err has it already
        text = f"{text}\n{traceback}" if text else traceback
    return text


def format_text(event: LogEvent) -> str:
    """``TIME [SYSTEM] TEXT`` and a newline; SYSTEM is ``namespace#level``
    when the event has no system of its own."""
    level = event.get("log_level")
    system = event.get("log_system") or "{}#{}".format(
        event.get("log_namespace", "-"), getattr(level, "name", "-")
    )
    when = formatTime(event.get("log_time"))
    return f"{when} [{one_line(str(system))}] {one_line(event_text(event))}\n"


def _shown_fields(event: LogEvent) -> Iterator[tuple[str, Any]]:
    """The event's fields that its format string shows, if plain values."""
    log_format = event.get("log_format")
    if not isinstance(log_format, str):
        return
    try:
        parsed = list(string.Formatter().parse(log_format))
    except ValueError:
        return
    for _, field, _, _ in parsed:
        name = re.split(r"[.\[(]", field or "", maxsplit=1)[0]
        if not name or name.startswith("log_") or name in _RESERVED or name not in event:
            continue
        value = event[name]
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        if isinstance(value, _SCALARS):
            yield name, value


def format_json(event: LogEvent) -> str:
    """One JSON object (ASCII only) and a newline."""
    log_time = event.get("log_time")
    record: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(log_time, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
            if isinstance(log_time, int | float)
            else None
        ),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
    }
    system = event.get("log_system")
    if system not in (None, "-"):
        record["system"] = str(system)
    record["text"] = formatEvent(event)
    traceback = _traceback(event)
    if traceback and traceback not in record["text"]:
        record["traceback"] = traceback
    record.update(_shown_fields(event))
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str) + "\n"


FORMATTERS: dict[str, Callable[[LogEvent], str]] = {"text": format_text, "json": format_json}


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one line to a file and flushes it (under
    systemd standard output is a pipe: nothing must wait in a buffer)."""

    def __init__(self, out: IO[str] | LogFile, format_event: Callable[[LogEvent], str]) -> None:
        self._out = out
        self._format = format_event
        self._encoding = getattr(out, "encoding", None) or "utf-8"
        self._lock = threading.Lock()  # events come from threads too

    def __call__(self, event: LogEvent) -> None:
        line = self._format(event)
        # a character the file cannot take must not make the observer fail
        line = line.encode(self._encoding, "backslashreplace").decode(self._encoding)
        with self._lock:
            self._out.write(line)
            self._out.flush()


def observer(log_format: str, out: IO[str] | LogFile) -> LineObserver:
    """An observer writing ``log_format`` (``text`` or ``json``) lines to ``out``."""
    return LineObserver(out, FORMATTERS[log_format])


_factory: Callable[[], ILogObserver] | None = None


def use_for_twistd(server_options: MutableMapping[str, Any] | None, log_format: str) -> bool:
    """Have twistd (whose options are ``server_options``, the parent of ours)
    log in ``log_format``; False when it keeps its own observer: there is no
    twistd, or the operator chose ``--logger`` or ``--syslog``."""
    global _factory
    if server_options is None:
        return False
    if server_options.get("logger") or server_options.get("syslog"):
        return False
    logfile = server_options.get("logfile") or ""
    nodaemon = bool(server_options.get("nodaemon"))
    if logfile == "-" and not nodaemon:
        return False  # twistd refuses this with a line of its own
    _factory = partial(_twistd_observer, log_format, logfile, nodaemon)
    server_options["logger"] = f"{__name__}.twistd_observer"
    return True


def twistd_observer() -> ILogObserver:
    """The observer factory ``use_for_twistd`` names as twistd's ``--logger``."""
    if _factory is None:
        raise RuntimeError("im58d.logging.use_for_twistd was not called")
    return _factory()


def _twistd_observer(log_format: str, logfile: str, nodaemon: bool) -> ILogObserver:
    # called by twistd before it redirects sys.stdout into the log
    if logfile == "-" or (nodaemon and not logfile):
        return observer(log_format, sys.stdout)
    rotating = LogFile.fromFullPath(logfile or "twistd.log")
    _rotate_on_sigusr1(rotating)
    return observer(log_format, rotating)


def _rotate_on_sigusr1(logfile: LogFile) -> None:
    """As twistd does for its own log file, unless SIGUSR1 is taken."""
    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(logfile.rotate)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate)


# query parameters whose values are harmless (GET /v1/inbox, /v1/stats)
SAFE_QUERY = frozenset({b"after", b"limit", b"days"})


def scrub_url(url: bytes) -> bytes:
    """A request target or URL fit for a log: no fragment, and ``*`` for
    every query parameter but the harmless ones (a client that puts a token
    in a query string does not get it logged)."""
    url = url.partition(b"#")[0]
    path, question, query = url.partition(b"?")
    if not question:
        return path
    items = [
        item if item.partition(b"=")[0] in SAFE_QUERY else b"*"
        for item in query.split(b"&")
    ]
    return path + b"?" + b"&".join(items)


class _ScrubbedRequest:
    """A request as the access log sees it: target and referrer scrubbed."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = scrub_url(request.uri or b"")

    def getHeader(self, name: bytes) -> bytes | None:
        value: bytes | None = self._request.getHeader(name)
        if value is not None and name.lower() == b"referer":
            return scrub_url(value)
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


@provider(IAccessLogFormatter)
def access_log_formatter(timestamp: str, request: Any) -> str:
    """twisted.web's combined log line, of the scrubbed request."""
    line: str = combinedLogFormatter(timestamp, _ScrubbedRequest(request))
    return line
