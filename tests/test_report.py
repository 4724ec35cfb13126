"""Client log reports on the server: ``POST /v1/report``, ``GET /v1/stats``
and the store's counters (PROTOCOL.md section 3).

In memory: the Harness's store on ``:memory:`` and its clock, the HTTP site
through ``StubTreq``.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sqlite3
import zlib
from typing import Any

import msgpack
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from im58d import bench
from im58d.client import report as client_report
from im58d.store import reports as store_reports
from im58d.store.sqlite import open_database, schema_scripts
from im58d.web import report as web_report
from im58d.web.report import MAX_INFLATED, inflate
from im58d.web.resource import HTTPError
from im58d.web.root import make_site

from .support import NOW, Harness, add_user
from .test_messages import b64, named_device

URL = "http://im58d.test"
ADMIN = "admin-secret"
TODAY = store_reports.day_of(NOW)


def batch(batch_id: str = "dev1-1", counts: dict[str, int] | None = None,
          **fields: Any) -> dict[str, Any]:
    counts = {"click.buttonA": 3, "view.home": 1} if counts is None else counts
    body: dict[str, Any] = {"id": batch_id, "t": [NOW - 60, NOW], "k": list(counts),
                            "c": list(counts.values())}
    body.update(fields)
    return body


class ReportCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.site = make_site(self.h.iplist, self.h.sessions, self.h.store, self.h.reactor,
                              admin_token=ADMIN)
        self.treq: Any = StubTreq(self.site.resource)
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.alice = self.login("alice")
        self.bob = self.login("bob")

    def login(self, user: str) -> str:
        """A session for the user's device signed in over POST /v1/login: its
        bearer token (the device stays offline)."""
        code, answer = self.h.http("POST", "/v1/login", body={
            "user": user, "password": "pw", "device_id": b64(named_device(f"{user}-reports"))})
        self.assertEqual(code, 200, answer)
        token: str = answer["token"]
        return token

    def request(self, method: str, path: str, data: bytes | None = None,
                headers: dict[str, str] | None = None, treq: Any = None) -> tuple[int, Any]:
        treq = treq or self.treq
        raw = {k: [v] for k, v in (headers or {}).items()}
        d = treq.request(method, URL + path, headers=raw, data=data)
        for _ in range(3):
            self.h.turn()
            treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        return response.code, json.loads(content) if content else None

    def post(self, body: Any, token: str | None = "alice", kind: str = "json",
             gzipped: bool = False, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """POST /v1/report with ``body`` (a value to encode, or bytes as they are)."""
        if isinstance(body, bytes):
            data = body
        elif kind == "msgpack":
            data = msgpack.packb(body)
        else:
            data = json.dumps(body).encode()
        all_headers = {"Content-Type": "application/msgpack" if kind == "msgpack"
                       else "application/json"}
        if gzipped:
            data = gzip.compress(data)
            all_headers["Content-Encoding"] = "gzip"
        if token is not None:
            all_headers["Authorization"] = "Bearer " + {"alice": self.alice,
                                                        "bob": self.bob}.get(token, token)
        all_headers.update(headers or {})
        return self.request("POST", "/v1/report", data, all_headers)

    def advance(self, seconds: float) -> None:
        """Let time pass; the sessions of /v1/login last (their devices are
        offline), so alice and bob keep their tokens."""
        self.h.reactor.advance(seconds)

    def stats(self, key: str, days: int = 1) -> list[dict[str, Any]]:
        d = self.h.store.stats(key, days, int(self.h.reactor.seconds()))
        self.h.turn()
        rows: list[dict[str, Any]] = self.successResultOf(d)
        return rows

    def today(self, key: str) -> tuple[int, int]:
        row = self.stats(key)[-1]
        return row["count"], row["users"]

    def rows(self, table: str) -> int:
        db = self.h.store._db
        assert db is not None
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def assertNothingCounted(self) -> None:
        self.assertEqual([self.rows(t) for t in ("report_counts", "report_users",
                                                 "report_batches")], [0, 0, 0])

    def assertRefused(self, answer: tuple[int, Any], status: int, *words: str) -> None:
        code, body = answer
        self.assertEqual(code, status, body)
        self.assertEqual(body["error"]["code"], {400: "bad_request", 413: "too_large"}
                         .get(status, body["error"]["code"]))
        for word in words:
            self.assertIn(word, body["error"]["message"])
        self.assertNothingCounted()


class PostTests(ReportCase):
    def test_json_batch(self) -> None:
        """A JSON batch is answered 204 with no body; its counts land on the
        UTC day of receipt, with the user as a user of each key."""
        code, body = self.post(batch())
        self.assertEqual((code, body), (204, None))
        self.assertEqual(self.today("click.buttonA"), (3, 1))
        self.assertEqual(self.today("view.home"), (1, 1))
        self.assertEqual(self.today("never.sent"), (0, 0))
        self.assertEqual((self.h.store.report_batches, self.h.store.report_repeats), (1, 0))

    def test_msgpack_gzip_and_both(self) -> None:
        """MessagePack (Content-Type: application/msgpack), gzip (Content-
        Encoding: gzip) and the two together are taken like JSON."""
        self.assertEqual(self.post(batch("a"), kind="msgpack")[0], 204)
        self.assertEqual(self.post(batch("b"), gzipped=True)[0], 204)
        self.assertEqual(self.post(batch("c"), kind="msgpack", gzipped=True)[0], 204)
        self.assertEqual(self.post(batch("d"), headers={
            "Content-Type": "application/x-msgpack"}, kind="msgpack")[0], 204)
        self.assertEqual(self.post(batch("e"), headers={
            "Content-Type": "application/json; charset=utf-8"})[0], 204)
        self.assertEqual(self.today("click.buttonA"), (15, 1))

    def test_gzip_of_several_members(self) -> None:
        """A gzip body of two members in a row is one body (RFC 1952)."""
        data = json.dumps(batch()).encode()
        two = gzip.compress(data[:10]) + gzip.compress(data[10:])
        self.assertEqual(self.post(two, gzipped=False, headers={
            "Content-Encoding": "gzip"})[0], 204)
        self.assertEqual(self.today("click.buttonA"), (3, 1))

    def test_repeated_batch_counted_once(self) -> None:
        """A batch id the user sent before is answered 204 and counts
        nothing; the same id from another user is another batch."""
        self.assertEqual(self.post(batch("dev1-7"))[0], 204)
        self.assertEqual(self.post(batch("dev1-7", {"click.buttonA": 100}))[0], 204)
        self.assertEqual(self.today("click.buttonA"), (3, 1))
        self.assertEqual(self.post(batch("dev1-7"), token="bob")[0], 204)
        self.assertEqual(self.today("click.buttonA"), (6, 2))
        self.assertEqual((self.h.store.report_batches, self.h.store.report_repeats), (2, 1))

    def test_distinct_users(self) -> None:
        """Counts add up; each user counts once per day and key however
        many batches they send."""
        for n in range(3):
            self.post(batch(f"a-{n}", {"click.buttonA": 2}))
        self.post(batch("b-1", {"click.buttonA": 5, "view.home": 1}), token="bob")
        self.assertEqual(self.today("click.buttonA"), (11, 2))
        self.assertEqual(self.today("view.home"), (1, 1))

    def test_days_are_utc_days_of_receipt(self) -> None:
        """A batch received at 23:59:59 UTC counts for that day, one received
        a second later for the next, whatever its ``t`` says."""
        midnight = (NOW // 86400 + 1) * 86400
        self.advance(midnight - 1 - self.h.reactor.seconds())
        self.post(batch("x-1", {"k": 1}, t=[0, 1]))
        self.h.reactor.advance(1)
        self.post(batch("x-2", {"k": 2}, t=[0, 1]))
        rows = self.stats("k", 2)
        self.assertEqual([(r["count"], r["users"]) for r in rows], [(1, 1), (2, 1)])
        self.assertEqual(rows[1]["day"], store_reports.day_of(midnight))
        self.assertNotEqual(rows[0]["day"], rows[1]["day"])

    def test_empty_batch(self) -> None:
        """A batch without keys is taken (204) and counts nothing."""
        self.assertEqual(self.post(batch(counts={}))[0], 204)
        self.assertEqual(self.rows("report_counts"), 0)

    def test_extra_fields_ignored(self) -> None:
        """Fields the contract does not name are ignored (forward compatibility)."""
        self.assertEqual(self.post(batch(v=2, device="x"))[0], 204)

    def test_needs_a_token(self) -> None:
        """Without a valid token: 401, nothing counted."""
        self.assertRefused(self.post(batch(), token=None), 401)
        self.assertRefused(self.post(batch(), token="not-a-token"), 401)

    def test_only_post(self) -> None:
        """GET /v1/report is 405."""
        code, _ = self.request("GET", "/v1/report", headers={
            "Authorization": f"Bearer {self.alice}"})
        self.assertEqual(code, 405)


class LimitTests(ReportCase):
    def test_1000_keys_of_128_bytes_fit(self) -> None:
        """1,000 keys of 128 bytes in UTF-8 (3 digits, 41 CJK characters, 2
        letters) are within the limits, gzipped under 64 KiB."""
        counts = {f"{n:03d}" + "按" * 41 + "xx": 1 for n in range(1000)}
        self.assertTrue(all(len(k.encode()) == 128 for k in counts))
        self.assertEqual(self.post(batch(counts=counts), gzipped=True)[0], 204)
        self.assertEqual(self.rows("report_counts"), 1000)

    def test_1001_keys(self) -> None:
        """1,001 keys: 413, nothing counted."""
        counts = {f"k{n}": 1 for n in range(1001)}
        self.assertRefused(self.post(batch(counts=counts)), 413, "1000 keys")

    def test_key_over_128_bytes(self) -> None:
        """A key of 129 bytes (43 CJK characters): 413 naming it."""
        self.assertRefused(self.post(batch(counts={"ok": 1, "按" * 43: 1})), 413, "k[1]")
        self.assertRefused(self.post(batch(counts={"a" * 129: 1})), 413, "k[0]")

    def test_body_over_64_kib(self) -> None:
        """A body over 64 KiB as sent: 413, plain or gzipped."""
        big = batch(pad="x" * (64 * 1024))
        self.assertRefused(self.post(big), 413)
        packed = gzip.compress(random.Random(1).randbytes(70_000))
        self.assertGreater(len(packed), 64 * 1024)
        self.assertRefused(self.post(packed, headers={"Content-Encoding": "gzip"}), 413)

    def test_inflated_over_1_mib(self) -> None:
        """A gzip body that inflates past 1 MiB: 413; exactly 1 MiB is fine."""
        body = json.dumps(batch()).encode()
        exact = body[:-1] + b" " * (MAX_INFLATED - len(body)) + b"}"
        self.assertEqual(len(exact), MAX_INFLATED)
        self.assertEqual(self.post(gzip.compress(exact), headers={
            "Content-Encoding": "gzip"})[0], 204)
        self.h.store._db.execute("DELETE FROM report_batches")  # type: ignore[union-attr]
        self.h.store._db.execute("DELETE FROM report_counts")  # type: ignore[union-attr]
        self.h.store._db.execute("DELETE FROM report_users")  # type: ignore[union-attr]
        over = body[:-1] + b" " * (MAX_INFLATED + 1 - len(body)) + b"}"
        self.assertRefused(self.post(gzip.compress(over), headers={
            "Content-Encoding": "gzip"}), 413, "inflates")

    def test_gzip_bomb_is_not_inflated(self) -> None:
        """A 60 KB gzip of 60 MiB of zeros is refused (413) having inflated
        at most 1 MiB + 1 byte of it."""
        bomb = gzip.compress(b"\0" * (60 << 20), 9)
        self.assertLess(len(bomb), 64 * 1024)
        sizes: list[int] = []
        real = zlib.decompressobj

        class Spy:
            def __init__(self, *args: Any) -> None:
                self.inner = real(*args)

            def decompress(self, data: bytes, max_length: int = 0) -> bytes:
                self.assertBounded(max_length)
                out = self.inner.decompress(data, max_length)
                sizes.append(len(out))
                return out

            def assertBounded(self, max_length: int) -> None:
                assert 0 < max_length <= MAX_INFLATED + 1, max_length

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        self.patch(zlib, "decompressobj", Spy)
        self.assertRefused(self.post(bomb, headers={"Content-Encoding": "gzip"}), 413)
        self.assertLessEqual(sum(sizes), MAX_INFLATED + 1)

    def test_huge_count(self) -> None:
        """A count over a million per key and batch is 400; a million is fine."""
        self.assertRefused(self.post(batch(counts={"k": 1_000_001})), 400, "c[0]")
        self.assertRefused(self.post(batch(counts={"k": 2**64 - 1}), kind="msgpack"),
                           400, "c[0]")
        self.assertEqual(self.post(batch(counts={"k": 1_000_000}))[0], 204)


class MalformedTests(ReportCase):
    """Each malformed body: 400 naming what is wrong, nothing counted."""

    def check(self, body: Any, *words: str, **kwargs: Any) -> None:
        self.assertRefused(self.post(body, **kwargs), 400, *words)

    def test_not_json(self) -> None:
        """Not JSON, not UTF-8, or nested too deep."""
        self.check(b"{nope", "JSON")
        self.check(b"\xff\xfe{}", "JSON")
        self.check(b"[" * 60_000, "JSON")

    def test_not_msgpack(self) -> None:
        """Bad MessagePack: a reserved byte, cut short, trailing data, an int map key."""
        self.check(b"\xc1", "MessagePack", kind="msgpack")
        self.check(msgpack.packb(batch())[:-3], "MessagePack", kind="msgpack")
        self.check(msgpack.packb(batch()) + b"\x01", "MessagePack", kind="msgpack")
        self.check(msgpack.packb({1: 2}), "MessagePack", kind="msgpack")

    def test_bad_gzip(self) -> None:
        """A gzip stream cut short, or no gzip at all."""
        data = gzip.compress(json.dumps(batch()).encode())
        self.check(data[:-8], "cut short", headers={"Content-Encoding": "gzip"})
        self.check(b"not gzip at all", "gzip", headers={"Content-Encoding": "gzip"})

    def test_not_an_object(self) -> None:
        """A body that is not a map."""
        self.check([1, 2], "object")
        self.check("x", "object", kind="msgpack")

    def test_bad_id(self) -> None:
        """``id`` missing, empty, too long, of other characters or types."""
        for bad_id in (None, "", 7, "a" * 65, "has space", "ünïcode", ["x"]):
            body = batch()
            if bad_id is None:
                del body["id"]
            else:
                body["id"] = bad_id
            self.check(body, "'id'")
        self.check(batch(msgpack.packb("x")), "'id'", kind="msgpack")  # bin, not str

    def test_bad_t(self) -> None:
        """``t`` missing, not two whole numbers, or last before first."""
        for t in (None, [], [1], [1, 2, 3], [2, 1], [-1, 1], [1.5, 2], [True, 1], "1,2",
                  [0, 2**63]):
            body = batch()
            if t is None:
                del body["t"]
            else:
                body["t"] = t
            self.check(body, "'t'")

    def test_k_and_c(self) -> None:
        """``k`` or ``c`` not lists or missing, or of different lengths."""
        self.check(batch(k="click"), "'k'")
        self.check(batch(c={"a": 1}), "'c'")
        body = batch()
        del body["c"]
        self.check(body, "'c'")
        self.check(batch(k=["a", "b"], c=[1]), "'k' and 'c'")
        self.check(batch(k=["a"], c=[1, 2]), "'k' and 'c'")

    def test_bad_counts(self) -> None:
        """Counts below 1, floats, booleans, strings, null: 400 naming c[i]."""
        for count in (-1, 0, 1.0, True, "3", None, [1]):
            self.check(batch(k=["a", "b"], c=[1, count]), "c[1]")

    def test_bad_keys(self) -> None:
        """Empty, non-string, control characters, lone surrogates: 400 naming k[i]."""
        for key in ("", 5, None, ["a"], "tab\there", "nul\0", "del\x7f"):
            self.check(batch(k=["fine", key], c=[1, 1]), "k[1]")
        self.check(b'{"id":"a","t":[1,2],"k":["\\ud800"],"c":[1]}', "k[0]", "Unicode")

    def test_duplicate_keys(self) -> None:
        """A key twice in one batch is 400, not merged."""
        self.check(batch(k=["a", "b", "a"], c=[1, 2, 3]), "k[2]", "repeats")

    def test_unsupported_types(self) -> None:
        """Another Content-Type or Content-Encoding is 415."""
        code, body = self.post(batch(), headers={"Content-Type": "text/plain"})
        self.assertEqual((code, body["error"]["code"]), (415, "unsupported_media_type"))
        code, body = self.post(batch(), headers={"Content-Encoding": "br"})
        self.assertEqual((code, body["error"]["code"]), (415, "unsupported_encoding"))
        self.assertNothingCounted()


class StatsTests(ReportCase):
    def get(self, query: str, token: str | None = ADMIN, treq: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.request("GET", "/v1/stats" + query, headers=headers, treq=treq)

    def test_days_oldest_first_with_zeros(self) -> None:
        """The last D days up to today, oldest first, days without data as
        zeros; data before the window is left out."""
        self.post(batch("a-1", {"click.buttonA": 4}))  # day 0
        self.advance(86400)
        self.post(batch("a-2", {"click.buttonA": 1}))  # day 1
        self.advance(2 * 86400)
        self.post(batch("a-3", {"click.buttonA": 2}))  # day 3
        self.post(batch("b-1", {"click.buttonA": 2}), token="bob")
        code, answer = self.get("?key=click.buttonA&days=4")
        self.assertEqual(code, 200)
        days = [store_reports.day_of(NOW + n * 86400) for n in range(4)]
        self.assertEqual(answer, {"key": "click.buttonA", "days": [
            {"day": days[0], "count": 4, "users": 1},
            {"day": days[1], "count": 1, "users": 1},
            {"day": days[2], "count": 0, "users": 0},
            {"day": days[3], "count": 4, "users": 2},
        ]})
        code, answer = self.get("?key=click.buttonA&days=2")
        self.assertEqual([d["day"] for d in answer["days"]], days[2:])
        code, answer = self.get("?key=click.buttonA&days=366")
        self.assertEqual(len(answer["days"]), 366)
        self.assertEqual(answer["days"][-1]["day"], days[3])
        self.assertEqual(sum(d["count"] for d in answer["days"]), 9)

    def test_default_days(self) -> None:
        """Without days: the last 7 days."""
        code, answer = self.get("?key=k")
        self.assertEqual((code, len(answer["days"])), (200, 7))
        self.assertEqual(answer["days"][-1], {"day": TODAY, "count": 0, "users": 0})

    def test_unicode_key(self) -> None:
        """A key in the query is UTF-8, percent-encoded."""
        self.post(batch("a-1", {"点击.按钮A": 2}))
        code, answer = self.get("?key=%E7%82%B9%E5%87%BB.%E6%8C%89%E9%92%AEA&days=1")
        self.assertEqual(answer, {"key": "点击.按钮A",
                                  "days": [{"day": TODAY, "count": 2, "users": 1}]})

    def test_bad_queries(self) -> None:
        """days outside 1..366 or not a number, a missing or bad key: 400."""
        for query in ("?key=k&days=0", "?key=k&days=367", "?key=k&days=x", "?days=3",
                      "?key=&days=3", "?key=%ff", "?key=" + "a" * 129, "?key=a%00b"):
            code, answer = self.get(query)
            self.assertEqual((code, answer["error"]["code"]), (400, "bad_request"), query)

    def test_admin_only(self) -> None:
        """No token: 401; a wrong one or a user's token: 403; a site without
        an admin token: 403 even with a token."""
        self.assertEqual(self.get("?key=k", token=None)[0], 401)
        self.assertEqual(self.get("?key=k", token="wrong")[0], 403)
        self.assertEqual(self.get("?key=k", token=self.alice)[0], 403)
        code, answer = self.get("?key=k", token=ADMIN, treq=self.h.treq)  # no admin token
        self.assertEqual((code, answer["error"]["code"]), (403, "forbidden"))
        code, answer = self.get("?key=k", token="", treq=self.h.treq)
        self.assertEqual(code, 403)


class StoreTests(ReportCase):
    def record(self, uid: int, batch_id: str, counts: dict[str, int]) -> bool:
        d = self.h.store.record_report(uid, batch_id, counts, int(self.h.reactor.seconds()))
        self.h.turn()
        counted: bool = self.successResultOf(d)
        return counted

    def top(self, days: int, limit: int) -> list[dict[str, Any]]:
        d = self.h.store.top_keys(days, limit, int(self.h.reactor.seconds()))
        self.h.turn()
        rows: list[dict[str, Any]] = self.successResultOf(d)
        return rows

    def test_record_report(self) -> None:
        """True when counted, False for a repeat; the counters follow."""
        self.assertTrue(self.record(1, "a", {"k": 1}))
        self.assertFalse(self.record(1, "a", {"k": 1}))
        self.assertTrue(self.record(2, "a", {"k": 1}))
        self.assertEqual((self.h.store.report_batches, self.h.store.report_repeats), (2, 1))

    def test_top_keys(self) -> None:
        """The biggest counts over the window first (ties by key), users
        counted once over the whole window, at most ``limit``."""
        clock = self.h.reactor
        self.record(1, "old", {"gone": 1000})
        clock.advance(10 * 86400)
        self.record(1, "a", {"click": 5, "view": 2, "share": 2})
        clock.advance(86400)
        self.record(1, "b", {"click": 5})
        self.record(2, "c", {"click": 1, "view": 1})
        self.assertEqual(self.top(7, 10), [
            {"key": "click", "count": 11, "users": 2},
            {"key": "view", "count": 3, "users": 2},
            {"key": "share", "count": 2, "users": 1},
        ])
        self.assertEqual([r["key"] for r in self.top(1, 1)], ["click"])
        self.assertEqual(self.top(1, 10)[0], {"key": "click", "count": 6, "users": 2})
        self.assertEqual(self.top(12, 1)[0], {"key": "gone", "count": 1000, "users": 1})

    def test_one_transaction_per_batch(self) -> None:
        """A batch that fails half-way leaves nothing behind: not its id,
        not the keys counted before the failure."""
        db = self.h.store._db
        assert db is not None
        db.execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON report_counts "
                   "WHEN NEW.key = 'boom' BEGIN SELECT RAISE(ABORT, 'boom'); END")
        d = self.h.store.record_report(1, "a", {"fine": 1, "boom": 1}, NOW)
        self.h.turn()
        self.failureResultOf(d, sqlite3.IntegrityError)
        self.assertNothingCounted()
        self.assertEqual(self.h.store.report_batches, 0)
        # the same id goes through once the cause is gone
        db.execute("DROP TRIGGER boom")
        self.assertTrue(self.record(1, "a", {"fine": 1, "boom": 1}))

    def test_failure_is_a_500_and_counts_nothing(self) -> None:
        """When the store fails, the answer is 500 and the client may retry."""
        db = self.h.store._db
        assert db is not None
        db.execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON report_users "
                   "BEGIN SELECT RAISE(ABORT, 'boom'); END")
        code, answer = self.post(batch())
        self.assertEqual((code, answer["error"]["code"]), (500, "internal"))
        self.flushLoggedErrors(sqlite3.IntegrityError)
        self.assertNothingCounted()

    def test_batches_of_a_turn_share_a_transaction(self) -> None:
        """Reports of one reactor turn are committed together (group commit)."""
        before = self.h.store.batches
        ds = [self.h.store.record_report(uid, "a", {"k": 1}, NOW) for uid in range(1, 6)]
        self.h.turn()
        self.assertEqual([self.successResultOf(d) for d in ds], [True] * 5)
        self.assertEqual(self.h.store.batches - before, 1)
        self.assertEqual(self.today("k"), (5, 5))

    def test_batch_ids_forgotten_after_30_days(self) -> None:
        """Batch ids are kept 30 days after receipt, then forgotten."""
        self.record(1, "a", {"k": 1})
        self.h.reactor.advance(store_reports.BATCH_KEEP - 1)
        self.assertFalse(self.record(1, "a", {"k": 1}))
        self.h.reactor.advance(2)
        self.record(1, "other", {"k": 1})
        self.assertEqual(self.rows("report_batches"), 1)
        self.assertTrue(self.record(1, "a", {"k": 1}))

    def test_upgrade_keeps_reports(self) -> None:
        """A version-2 database with reports is upgraded: each day's users
        are counted into the new column."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        for number, sql in schema_scripts():
            if number <= 2:
                conn.executescript(sql)
        conn.executescript(
            "PRAGMA user_version = 2;"
            "INSERT INTO report_counts VALUES ('2027-01-01', 'k', 9);"
            "INSERT INTO report_users VALUES ('2027-01-01', 'k', 1), ('2027-01-01', 'k', 2);")
        conn.close()
        os.chmod(path, 0o600)
        db = open_database(path)
        self.assertEqual(db.execute("SELECT count, users FROM report_counts").fetchall(),
                         [(9, 2)])
        db.conn.close()


class SharedLimitsTests(SynchronousTestCase):
    def test_client_knows_the_server_limits(self) -> None:
        """The SDK checks batches against the server's own limits."""
        self.assertEqual(
            (client_report.MAX_KEYS, client_report.MAX_KEY_BYTES, client_report.MAX_COUNT,
             client_report.MAX_WIRE),
            (web_report.MAX_KEYS, web_report.MAX_KEY_BYTES, web_report.MAX_COUNT,
             web_report.MAX_WIRE))
        self.assertLess(client_report.MAX_AGE, store_reports.BATCH_KEEP)

    def test_inflate(self) -> None:
        """inflate: the bytes, or 413 past the limit, 400 for a cut stream."""
        self.assertEqual(inflate(gzip.compress(b"abc")), b"abc")
        self.assertEqual(inflate(gzip.compress(b"abcd"), 4), b"abcd")
        error = self.assertRaises(HTTPError, inflate, gzip.compress(b"abcde"), 4)
        self.assertEqual(error.status, 413)
        error = self.assertRaises(HTTPError, inflate, gzip.compress(b"abc")[:-1])
        self.assertEqual(error.status, 400)


class BenchTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_report_mode(self) -> Any:
        """``im58d-bench --mode report`` on a real daemon: the daemon counted
        every merged click (the bench checks its database), and merged
        batches cost a small fraction of one GET per event."""
        costs = yield Deferred.fromCoroutine(bench.report_mode(reactor, events=200))
        naive = costs["naive_get_per_event"]
        self.assertEqual(naive["requests"], 200)
        self.assertEqual(costs["merged_y100_msgpack_gzip"]["requests"], 2)
        self.assertEqual(costs["merged_one_batch_json_plain"]["requests"], 1)
        for name, cost in costs.items():
            if name.startswith("merged_"):
                self.assertLess(cost["bytes"] * 10, naive["bytes"], name)
