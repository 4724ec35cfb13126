"""The SDK's cache and sync (``im58d.client.cache``, ``im58d.client.sync``)
against the real server stack, in memory: a user with 500 friends in 5
categories and 50 groups, built straight in the server's database.

Requests are counted by wrapping the SDK client's ``http`` object: every
request's method, path and headers, and every response's status and body
(after gzip decoding, as the app sees it).
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import TestCase

from im58d.bench import sync_mode
from im58d.client import Cache, ClientState, Group, Sync, SyncError, User
from im58d.store.accounts import create_group_txn, make_friends_txn
from im58d.store.lists import add_category_txn
from im58d.wire import packets as P

from .support import NOW, add_user
from .test_client import DEVICE_ID, HTTP_URL, Device, RecordingHTTP, SDKTestCase

FRIENDS = 500
CATEGORIES = 5
GROUPS = 50
GROUP_SIZE = 10  # friends in each group, besides alice


class Exchange(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    upload: Any  # the JSON body sent, or None
    code: int
    body: bytes  # the response body (gzip decoded)


class _Counted:
    """A response whose body, once read, is noted in the exchange log."""

    def __init__(self, response: Any, http: CountingHTTP, method: str, path: str,
                 kwargs: dict[str, Any]) -> None:
        self.response = response
        self.code = response.code
        self.headers = response.headers
        self.http = http
        self.method = method
        self.path = path
        self.kwargs = kwargs

    def content(self) -> Deferred[bytes]:
        def noted(body: bytes) -> bytes:
            headers = {str(k): str(v) for k, v in (self.kwargs.get("headers") or {}).items()}
            self.http.exchanges.append(Exchange(self.method, self.path, headers,
                                                self.kwargs.get("json"), self.code, body))
            return body

        d: Deferred[bytes] = self.response.content()
        return d.addCallback(noted)

    def json(self) -> Deferred[Any]:
        return self.content().addCallback(lambda body: json.loads(body))


class CountingHTTP(RecordingHTTP):
    """RecordingHTTP that also logs each exchange and can break paths."""

    def __init__(self, treq: Any) -> None:
        super().__init__(treq)
        self.exchanges: list[Exchange] = []
        self.broken: set[str] = set()  # paths whose requests fail (no answer)

    def get(self, url: str, **kwargs: Any) -> Any:
        return self._counted("GET", url, kwargs, super().get)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self._counted("POST", url, kwargs, super().post)

    def _counted(self, method: str, url: str, kwargs: dict[str, Any], send: Any) -> Any:
        path = url[len(HTTP_URL):]
        if path in self.broken:
            self.requests.append((method, path))
            return fail(ConnectionRefusedError(f"{path} broken by the test"))
        return send(url, **kwargs).addCallback(_Counted, self, method, path, kwargs)

    def reset(self) -> None:
        self.requests = []
        self.exchanges = []

    @property
    def paths(self) -> list[tuple[str, str]]:
        return [(e.method, e.path) for e in self.exchanges]


class SyncTestCase(SDKTestCase):
    """alice with 500 friends (f0..f499, 100 in each of 5 categories) and 50
    groups she owns (each with 10 of the friends); bob and carol exist and are
    strangers to her."""

    def setUp(self) -> None:
        super().setUp()
        self.carol_uid = add_user(self.h.store, "carol")
        db = self.h.store._db
        assert db is not None
        db.conn.execute("BEGIN")
        self.categories = [add_category_txn(db, self.alice_uid, f"分组{i}")[0]
                           for i in range(CATEGORIES)]
        self.friends: list[int] = []
        for i in range(FRIENDS):
            uid = add_user(self.h.store, f"f{i}")
            make_friends_txn(db, self.alice_uid, uid, NOW)
            db.execute("UPDATE friends SET category = ? WHERE uid = ? AND friend = ?",
                       (self.categories[i % CATEGORIES], self.alice_uid, uid))
            self.friends.append(uid)
        self.gids = [
            create_group_txn(db, f"群{g}", self.alice_uid,
                             self.friends[g * GROUP_SIZE:(g + 1) * GROUP_SIZE], NOW, "灌水")
            for g in range(GROUPS)
        ]
        db.conn.execute("COMMIT")
        self.screen = self.friends[:20]  # the friends the app shows first

    def synced_device(
        self, cache: Cache | None = None, state: ClientState | None = None
    ) -> tuple[Device, Sync, CountingHTTP]:
        """alice on an SDK client with a Sync on ``cache``, started: the
        WELCOME's (or, with the ``state`` of an earlier run, the RESUMED's)
        sync has run."""
        sync = Sync(cache or Cache())
        alice = self.device("alice", password=None if state else "pw", state=state, sync=sync)
        http = CountingHTTP(self.h.treq)
        alice.client.http = http
        self.start(alice)
        self.settle()
        return alice, sync, http

    def result(self, d: Deferred[Any]) -> Any:
        self.settle()
        return self.successResultOf(d)

    def login(self, user: str) -> str:
        code, body = self.h.http("POST", "/v1/login",
                                 body={"user": user, "password": "pw",
                                       "device_id": DEVICE_ID, "device_name": "test"})
        self.assertEqual(code, 200, body)
        token: str = body["token"]
        return token

    def as_alice(self, alice: Device, method: str, path: str, body: Any = None) -> Any:
        code, answer = self.h.http(method, path, alice.client.token, body)
        self.assertLess(code, 300, answer)
        self.settle()  # CHANGED reaches the client, and its sync runs
        return answer


class ColdAndWarmTests(SyncTestCase):
    def test_cold_sync_lists_only(self) -> None:
        """The sync after WELCOME on an empty cache: the versions, then each
        list once (ids only); no details at all."""
        _, sync, http = self.synced_device()
        self.assertEqual(http.paths, [("GET", "/v1/versions"), ("GET", "/v1/friends"),
                                      ("GET", "/v1/groups"), ("GET", "/v1/categories")])
        self.assertEqual([e.code for e in http.exchanges], [200] * 4)
        self.assertNotIn("If-None-Match", http.exchanges[0].headers)
        cache = sync.cache
        self.assertEqual(len(cache.friends()), FRIENDS)
        self.assertEqual(cache.friends()[0], (self.friends[0], self.categories[0]))
        self.assertEqual(cache.categories(),
                         [(c, f"分组{i}") for i, c in enumerate(self.categories)])
        self.assertEqual(cache.groups(), self.gids)
        self.assertEqual((cache.user_count(), cache.group_count()), (0, 0))
        self.assertEqual(sync.rounds, 1)

    def test_warm_unchanged_is_one_request(self) -> None:
        """With nothing changed a sync is exactly one request: GET
        /v1/versions with the cached ETag, answered 304 with no body."""
        _, sync, http = self.synced_device()
        http.reset()
        moved = self.result(sync.run())
        self.assertEqual(moved, set())
        self.assertEqual(http.paths, [("GET", "/v1/versions")])
        [exchange] = http.exchanges
        self.assertEqual(exchange.headers["If-None-Match"], sync.cache.etag)
        self.assertEqual(exchange.code, 304)
        self.assertLess(len(exchange.body), 100)
        self.assertEqual(exchange.body, b"")

    def test_resumed_syncs(self) -> None:
        """After a drop the client resumes and syncs: one 304."""
        alice, sync, http = self.synced_device()
        http.reset()
        alice.link.cut()
        self.wait(2)
        self.assertEqual(alice.client.resumes, 1)
        self.assertEqual([(e.path, e.code) for e in http.exchanges], [("/v1/versions", 304)])
        self.assertEqual(sync.rounds, 2)

    def test_restart_from_the_cache_file(self) -> None:
        """The app restarts with its cache file (mode 0600) and its state:
        the first sync after it resumes is one 304.  The same file given to
        another account is emptied first."""
        path = self.mktemp()
        alice, _, _ = self.synced_device(Cache(path))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.result(alice.client.stop())
        reopened = Cache(path)
        self.assertEqual(len(reopened.friends()), FRIENDS)
        again, sync, http = self.synced_device(reopened, alice.client.state)
        self.assertEqual(again.client.resumes, 1)
        self.assertEqual(http.paths, [("GET", "/v1/versions")])
        self.assertEqual(http.exchanges[0].code, 304)
        self.assertEqual(sync.cache.uid, self.alice_uid)
        reopened.bind(self.bob_uid)
        self.assertEqual((reopened.friends(), reopened.etag, reopened.versions()),
                         ([], None, {}))


class DetailTests(SyncTestCase):
    def test_details_only_for_what_is_shown(self) -> None:
        """Details come only for the ids the app shows, in one request that
        uploads version 0 for each; shown again, they come from the cache."""
        _, sync, http = self.synced_device()
        http.reset()
        users = self.result(sync.show(self.screen))
        self.assertEqual(sorted(users), self.screen)
        self.assertEqual(users[self.screen[3]],
                         User(self.screen[3], "f3", 0, None, users[self.screen[3]].version))
        [exchange] = http.exchanges
        self.assertEqual((exchange.method, exchange.path), ("POST", "/v1/users/sync"))
        self.assertEqual(exchange.upload, {"have": {str(u): 0 for u in self.screen}})
        self.assertEqual(sync.cache.user_count(), 20)  # not the other 480
        http.reset()
        self.assertEqual(self.result(sync.show(self.screen)), users)
        self.assertEqual(http.exchanges, [])
        groups = self.result(sync.show_groups(self.gids[:3]))
        self.assertEqual(groups[self.gids[0]],
                         Group(self.gids[0], "群0", "灌水", self.alice_uid,
                               groups[self.gids[0]].version, groups[self.gids[0]].version))
        self.assertEqual(http.paths, [("POST", "/v1/groups/sync")])
        self.assertEqual(sync.cache.group_count(), 3)

    def test_one_nick_changed(self) -> None:
        """A friend changes their nick: the next sync is one request (the
        versions moved: friend_rows) and marks the cached friends stale; the
        screen's refresh uploads the 20 versions and gets exactly one user."""
        _, sync, http = self.synced_device()
        self.result(sync.show(self.screen))
        changed = self.screen[7]
        code, _ = self.h.http("PATCH", "/v1/me", self.login("f7"), {"nick": "新名字"})
        self.assertEqual(code, 200)
        http.reset()
        moved = self.result(sync.run())
        self.assertEqual(moved, {"friend_rows"})
        self.assertEqual(http.paths, [("GET", "/v1/versions")])
        self.assertTrue(all(u.stale for u in sync.cache.users(self.screen).values()))
        http.reset()
        users = self.result(sync.show(self.screen))
        [exchange] = http.exchanges
        self.assertEqual(exchange.path, "/v1/users/sync")
        self.assertEqual(len(exchange.upload["have"]), 20)
        self.assertNotIn(0, exchange.upload["have"].values())
        rows = json.loads(exchange.body)["users"]
        self.assertEqual([row["id"] for row in rows], [changed])
        self.assertEqual(users[changed].nick, "新名字")
        self.assertFalse(any(u.stale for u in users.values()))
        self.assertEqual(sync.cache.user_count(), 20)

    def test_own_profile(self) -> None:
        """The user's own row goes stale when "me" moves."""
        alice, sync, http = self.synced_device()
        self.result(sync.show([self.alice_uid]))
        self.as_alice(alice, "PATCH", "/v1/me", {"gender": 2})
        http.reset()
        self.assertEqual(self.result(sync.run()), {"me"})
        me = self.result(sync.show([self.alice_uid]))[self.alice_uid]
        self.assertEqual((me.gender, me.stale), (2, False))
        self.assertEqual(http.paths, [("GET", "/v1/versions"), ("POST", "/v1/users/sync")])

    def test_strangers_are_left_out(self) -> None:
        """A user the server does not show this account is not cached."""
        _, sync, _ = self.synced_device()
        self.assertEqual(self.result(sync.show([self.carol_uid])), {})
        self.assertIsNone(sync.cache.user(self.carol_uid))

    def test_members(self) -> None:
        """A group's members are fetched when shown; again, from the cache;
        after a member joins, the group's row (members_version) and then the
        member list are fetched once more, with If-None-Match."""
        alice, sync, http = self.synced_device()
        gid = self.gids[4]
        http.reset()
        members = self.result(sync.members(gid))
        self.assertEqual(members, sorted([self.alice_uid, *self.friends[40:50]]))
        self.assertEqual(http.paths, [("POST", "/v1/groups/sync"),
                                      ("GET", f"/v1/groups/{gid}/members")])
        http.reset()
        self.assertEqual(self.result(sync.members(gid)), members)
        self.assertEqual(http.exchanges, [])
        cached = sync.cache.group(gid)
        assert cached is not None
        self.as_alice(alice, "POST", f"/v1/groups/{gid}/members", {"uid": self.bob_uid})
        self.assertEqual(http.exchanges, [])  # alice's group list did not move: no CHANGED
        self.assertEqual(self.result(sync.run()), {"group_rows"})
        http.reset()
        self.assertEqual(self.result(sync.members(gid)), sorted([*members, self.bob_uid]))
        self.assertEqual(http.paths, [("POST", "/v1/groups/sync"),
                                      ("GET", f"/v1/groups/{gid}/members")])
        self.assertEqual(http.exchanges[0].upload, {"have": {str(gid): cached.version}})
        self.assertEqual(http.exchanges[1].headers["If-None-Match"],
                         f'"{cached.members_version}"')
        self.assertGreater(sync.cache.members_version(gid) or 0, cached.members_version)
        bob = self.result(sync.show([self.bob_uid]))[self.bob_uid]
        self.assertEqual(bob.nick, "bob")  # a group member's details
        self.assertIsNone(self.result(sync.members(self.gids[0] + 1000)))


class ListTests(SyncTestCase):
    """Each change pulls only the list that moved (the sync CHANGED starts)."""

    def test_friend_added(self) -> None:
        alice, sync, http = self.synced_device()
        bob_token = self.login("bob")
        code, _ = self.h.http("POST", "/v1/friends", bob_token, {"uid": self.alice_uid})
        self.assertEqual(code, 202)
        self.settle()
        http.reset()
        self.as_alice(alice, "POST", "/v1/friends",
                      {"uid": self.bob_uid, "category": self.categories[2]})
        self.assertEqual(http.paths, [("GET", "/v1/versions"), ("GET", "/v1/friends")])
        self.assertEqual(http.exchanges[1].headers["If-None-Match"],
                         f'"{sync.cache.versions()["friends"] - 1}"')
        self.assertIn((self.bob_uid, self.categories[2]), sync.cache.friends())

    def test_group_joined(self) -> None:
        alice, sync, http = self.synced_device()
        code, body = self.h.http("POST", "/v1/groups", self.login("bob"),
                                 {"name": "新群", "members": [self.alice_uid]})
        self.assertEqual(code, 201)
        http.reset()
        self.settle()
        self.assertEqual(http.paths, [("GET", "/v1/versions"), ("GET", "/v1/groups")])
        self.assertEqual(sync.cache.groups(), [*self.gids, body["id"]])
        self.assertEqual(sync.cache.group_count(), 0)  # details stay lazy

    def test_category_added(self) -> None:
        alice, sync, http = self.synced_device()
        http.reset()
        added = self.as_alice(alice, "POST", "/v1/categories", {"name": "同事"})
        self.assertEqual(http.paths, [("GET", "/v1/versions"), ("GET", "/v1/categories")])
        self.assertEqual(sync.cache.categories()[-1], (added["id"], "同事"))

    def test_group_left(self) -> None:
        """A group left goes from the cache with its details and members."""
        alice, sync, http = self.synced_device()
        gid = self.gids[0]
        self.result(sync.members(gid))
        http.reset()
        self.as_alice(alice, "DELETE", f"/v1/groups/{gid}/members/{self.alice_uid}")
        self.assertEqual(http.paths, [("GET", "/v1/versions"), ("GET", "/v1/groups")])
        self.assertNotIn(gid, sync.cache.groups())
        self.assertEqual((sync.cache.group(gid), sync.cache.members(gid)), (None, None))

    def test_friend_removed_and_refiled(self) -> None:
        alice, sync, http = self.synced_device()
        gone, refiled = self.friends[0], self.friends[1]
        self.as_alice(alice, "DELETE", f"/v1/friends/{gone}")
        self.as_alice(alice, "PUT", f"/v1/friends/{refiled}", {"category": 0})
        friends = dict(sync.cache.friends())
        self.assertNotIn(gone, friends)
        self.assertEqual(friends[refiled], 0)
        self.assertEqual(sync.cache.versions()["friends"],
                         self.h.http("GET", "/v1/friends", alice.client.token)[1]["version"])

    def test_changed_for_a_version_held(self) -> None:
        """A CHANGED whose version the cache holds already costs nothing."""
        alice, sync, http = self.synced_device()
        http.reset()
        alice.client._dispatch(alice.link.wire,
                               P.Changed("friends", sync.cache.versions()["friends"]))
        self.settle()
        self.assertEqual(http.exchanges, [])

    def test_requests_and_devices_cost_nothing(self) -> None:
        """CHANGED for pending friend requests or for devices reaches the app
        (on_changed) and costs the cache no request: it holds neither list."""
        alice, sync, http = self.synced_device()
        changes: list[tuple[str, int]] = []
        alice.client.on_changed = lambda what, version: changes.append((what, version))
        http.reset()
        code, _ = self.h.http("POST", "/v1/friends", self.login("bob"), {"uid": self.alice_uid})
        self.assertEqual(code, 202)
        self.settle()
        tablet = self.device("alice", device="tablet")
        self.start(tablet)
        self.assertEqual([what for what, _ in changes], ["requests", "devices"])
        self.assertEqual(http.exchanges, [])
        self.assertEqual(sync.rounds, 1)


class FailureTests(SyncTestCase):
    def test_failed_request_leaves_the_cache(self) -> None:
        """A list request that fails fails the round, and the cache keeps
        everything it had (versions, ETag, lists); the next round asks
        again and succeeds."""
        _, sync, http = self.synced_device()
        cache = sync.cache
        before = (cache.etag, cache.versions(), cache.friends(), cache.groups())
        db = self.h.store._db
        assert db is not None
        make_friends_txn(db, self.alice_uid, self.carol_uid, NOW)
        create_group_txn(db, "x", self.bob_uid, [self.alice_uid], NOW)
        http.broken.add("/v1/groups")
        http.reset()
        d = sync.run()
        self.settle()
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual(http.requests, [("GET", "/v1/versions"), ("GET", "/v1/friends"),
                                         ("GET", "/v1/groups")])
        self.assertEqual((cache.etag, cache.versions(), cache.friends(), cache.groups()),
                         before)
        self.assertEqual(sync.rounds, 1)
        http.broken.clear()
        http.reset()
        # carol's row is older than the friends': friend_rows did not move
        self.assertEqual(self.result(sync.run()), {"friends", "groups", "group_rows"})
        self.assertEqual(http.paths, [("GET", "/v1/versions"), ("GET", "/v1/friends"),
                                      ("GET", "/v1/groups")])
        self.assertIn(self.carol_uid, dict(cache.friends()))
        self.assertEqual(len(cache.groups()), GROUPS + 1)

    def test_failed_details_stay_stale(self) -> None:
        _, sync, http = self.synced_device()
        self.result(sync.show(self.screen))
        self.h.http("PATCH", "/v1/me", self.login("f1"), {"nick": "x"})
        self.result(sync.run())
        http.broken.add("/v1/users/sync")
        d = sync.show(self.screen)
        self.settle()
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertTrue(all(u.stale for u in sync.cache.users(self.screen).values()))
        http.broken.clear()
        self.assertEqual(self.result(sync.show(self.screen))[self.screen[1]].nick, "x")

    def test_not_logged_in(self) -> None:
        d = Sync(Cache()).run()
        self.failureResultOf(d, SyncError)

    def test_rounds_do_not_overlap(self) -> None:
        """A round asked for while one runs starts after it, once."""
        _, sync, http = self.synced_device()
        http.reset()
        first, second, third = sync.run(), sync.run(), sync.run()
        self.settle()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second),
                          self.successResultOf(third)), (set(), set(), set()))
        self.assertEqual(http.paths, [("GET", "/v1/versions")] * 2)


class BenchSyncTests(TestCase):
    """``im58d-bench --mode sync`` on a small world: a real daemon, real HTTP
    over loopback, bytes counted at the socket."""

    timeout = 120

    def test_sync_mode(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(sync_mode(reactor, friends=40, categories=2, groups=4,
                                             group_size=5))
        return d.addCallback(self.check)

    def check(self, costs: dict[str, dict[str, Any]]) -> None:
        for variant in ("gzip", "plain"):
            cost = {name[: -len(variant) - 1]: value for name, value in costs.items()
                    if name.endswith(variant)}
            requests = {name: value["requests"] for name, value in cost.items()}
            self.assertEqual(requests, {
                "cold_sync": 4, "first_screen": 1, "warm_unchanged": 1, "one_nick_changed": 2,
                "cold_everything": 4 + 2 + 4, "naive_lists_details": 5,
                "naive_with_members": 5 + 4})
            # a 304: the status line and a few headers, no body
            self.assertLess(cost["warm_unchanged"]["bytes_down"], 200)
            total = {name: value["bytes"] for name, value in cost.items()}
            self.assertLess(total["warm_unchanged"], total["one_nick_changed"])
            self.assertLess(total["one_nick_changed"], total["cold_sync"])
            self.assertLess(total["cold_sync"], total["naive_lists_details"])
