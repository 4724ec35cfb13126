"""``POST /v1/report`` (batched client log reports) and ``GET /v1/stats``
(PROTOCOL.md section 3).

A report body is checked whole before anything is counted: its size on the
wire and inflated, its encoding, every field.  A gzip body is inflated with
a bound, so a small bomb costs at most ``MAX_INFLATED`` bytes of memory.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

import msgpack
from twisted.internet.defer import Deferred
from twisted.web.server import Request

from ..store.interfaces import IStore
from .resource import AdminResource, AuthResource, HTTPError, query_int, respond

MAX_WIRE = 64 * 1024  # bytes of the body as sent (compressed or not)
MAX_INFLATED = 1024 * 1024  # bytes of the body once inflated
MAX_KEYS = 1000
MAX_KEY_BYTES = 128  # UTF-8
MAX_COUNT = 1_000_000  # per key and batch
MAX_DAYS = 366
DEFAULT_DAYS = 7
# batch ids: what a client makes of a device id and a counter, or a UUID
BATCH_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MSGPACK_TYPES = frozenset((b"application/msgpack", b"application/x-msgpack"))
JSON_TYPES = frozenset((b"application/json", b""))


def bad(message: str) -> HTTPError:
    return HTTPError(400, "bad_request", message)


def too_large(message: str) -> HTTPError:
    return HTTPError(413, "too_large", message)


def inflate(data: bytes, limit: int = MAX_INFLATED) -> bytes:
    """A gzip body inflated, never past ``limit`` bytes: 413 beyond it, 400
    for data that is not gzip or is cut short.  Several gzip members in a
    row are one body, as RFC 1952 has it."""
    out = bytearray()
    rest = data
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(rest, limit + 1 - len(out))
        except zlib.error as e:
            raise bad(f"the body is not valid gzip ({e})") from None
        if len(out) > limit:
            raise too_large(f"the body inflates to over {limit} bytes")
        if not inflater.eof:
            raise bad("the gzip body is cut short")
        rest = inflater.unused_data
        if not rest:
            return bytes(out)


def _header(request: Request, name: bytes) -> bytes:
    value = request.getHeader(name) or b""
    return value.split(b";", 1)[0].strip().lower()


def read_body(request: Request) -> Any:
    """The decoded report body: JSON, or MessagePack with ``Content-Type:
    application/msgpack``; either may come with ``Content-Encoding: gzip``."""
    content = request.content
    data = content.read(MAX_WIRE + 1) if content is not None else b""
    if len(data) > MAX_WIRE:
        raise too_large(f"the body is over {MAX_WIRE} bytes")
    encoding = _header(request, b"content-encoding")
    if encoding in (b"gzip", b"x-gzip"):
        data = inflate(data)
    elif encoding not in (b"", b"identity"):
        raise HTTPError(415, "unsupported_encoding", "Content-Encoding must be gzip or none")
    kind = _header(request, b"content-type")
    if kind in MSGPACK_TYPES:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception:
            raise bad("the body is not MessagePack") from None
    if kind in JSON_TYPES:
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise bad("the body is not JSON") from None
    raise HTTPError(415, "unsupported_media_type",
                    "Content-Type must be application/json or application/msgpack")


def _whole(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def check_key(key: Any, name: str) -> str:
    """A report key: a non-empty string without control characters, at most
    ``MAX_KEY_BYTES`` bytes in UTF-8 (413 beyond)."""
    if type(key) is not str or not key:
        raise bad(f"{name} must be a non-empty string")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise bad(f"{name} is not valid Unicode") from None
    if size > MAX_KEY_BYTES:
        raise too_large(f"{name} is over {MAX_KEY_BYTES} bytes")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in key):
        raise bad(f"{name} holds a control character")
    return key


def parse_report(body: Any) -> tuple[str, dict[str, int]]:
    """``(batch id, {key: count})`` of a decoded report body; HTTPError 400
    naming the field, or 413 past a limit."""
    if not isinstance(body, dict):
        raise bad("the body must be an object")
    batch_id = body.get("id")
    if type(batch_id) is not str or not BATCH_ID.fullmatch(batch_id):
        raise bad("field 'id' must be 1 to 64 letters, digits or . _ : -")
    t = body.get("t")
    if not (type(t) is list and len(t) == 2 and all(_whole(x, 0, (1 << 63) - 1) for x in t)
            and t[0] <= t[1]):
        raise bad("field 't' must be [first_ts, last_ts], whole numbers, first <= last")
    keys, counts = body.get("k"), body.get("c")
    if type(keys) is not list:
        raise bad("field 'k' must be a list")
    if type(counts) is not list:
        raise bad("field 'c' must be a list")
    if max(len(keys), len(counts)) > MAX_KEYS:
        raise too_large(f"at most {MAX_KEYS} keys per batch")
    if len(keys) != len(counts):
        raise bad("fields 'k' and 'c' must be as long as each other")
    merged: dict[str, int] = {}
    for i, (key, count) in enumerate(zip(keys, counts, strict=True)):
        check_key(key, f"k[{i}]")
        if key in merged:
            raise bad(f"k[{i}] repeats the key {key!r}")
        if not _whole(count, 1, MAX_COUNT):
            raise bad(f"c[{i}] must be a whole number in 1..{MAX_COUNT}")
        merged[key] = count
    return batch_id, merged


class ReportResource(AuthResource):
    """``POST /v1/report``: 204 once the batch is committed (or was before)."""

    def __init__(self, sessions: Any, store: IStore, clock: Any) -> None:
        super().__init__(sessions)
        self.store = store
        self.clock = clock

    def render_POST(self, request: Request) -> Deferred[bytes]:
        uid = self.session(request).uid
        batch_id, counts = parse_report(read_body(request))
        d = self.store.record_report(uid, batch_id, counts, int(self.clock.seconds()))
        return d.addCallback(lambda counted: _no_content(request))


def _no_content(request: Request) -> bytes:
    request.setResponseCode(204)
    return b""


class StatsResource(AdminResource):
    """``GET /v1/stats?key=K&days=D``: a key's count and distinct users per
    UTC day, the last D days up to today, oldest first."""

    def __init__(self, admin_token: str, store: IStore, clock: Any) -> None:
        super().__init__(admin_token)
        self.store = store
        self.clock = clock

    def render_GET(self, request: Request) -> Deferred[bytes]:
        values = (request.args or {}).get(b"key")
        if not values:
            raise bad("key is required")
        try:
            key = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise bad("key is not UTF-8") from None
        try:
            check_key(key, "key")
        except HTTPError as e:
            raise bad(e.message) from None  # a query is not a body: 400, not 413
        days = query_int(request, "days", DEFAULT_DAYS, 1, MAX_DAYS)
        d = self.store.stats(key, days, int(self.clock.seconds()))
        return d.addCallback(lambda rows: respond(request, {"key": key, "days": rows}))
