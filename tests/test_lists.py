"""The list API over HTTP (PROTOCOL.md section 2): versions, friends,
categories, groups and their members, profiles, and the CHANGED notices
that follow a change."""

from __future__ import annotations

import gzip
import json
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from im58d.web.lists import MAX_HAVE
from im58d.web.root import make_site
from im58d.wire import packets as P

from .support import NOW, Client, Harness, add_user
from .test_messages import b64, named_device

NAMES = ("alice", "bob", "carol", "dave")

# every route that needs a logged-in user, with a body it would accept
AUTHENTICATED: tuple[tuple[str, str, Any], ...] = (
    ("GET", "/v1/versions", None),
    ("GET", "/v1/friends", None),
    ("POST", "/v1/friends", {"uid": 2}),
    ("GET", "/v1/friends/requests", None),
    ("DELETE", "/v1/friends/2", None),
    ("PUT", "/v1/friends/2", {"category": 0}),
    ("GET", "/v1/categories", None),
    ("POST", "/v1/categories", {"name": "Work"}),
    ("GET", "/v1/groups", None),
    ("POST", "/v1/groups", {"name": "g"}),
    ("POST", "/v1/groups/sync", {"have": {}}),
    ("GET", "/v1/groups/1/members", None),
    ("POST", "/v1/groups/1/members", {"uid": 2}),
    ("DELETE", "/v1/groups/1/members/1", None),
    ("POST", "/v1/users/sync", {"have": {}}),
    ("PATCH", "/v1/me", {"nick": "x"}),
    ("GET", "/v1/devices", None),
    ("DELETE", "/v1/devices/current", None),
)


@implementer(IBodyProducer)
class _Body:
    """A request body written at once (FileBodyProducer needs a running
    reactor's cooperator)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class ListTestCase(SynchronousTestCase):
    """Four users, each logged in over TCP (so CHANGED can reach them)."""

    def setUp(self) -> None:
        self.h = Harness()
        self.uid: dict[str, int] = {}
        self.token: dict[str, str] = {}
        self.client: dict[str, Client] = {}
        for name in NAMES:
            self.uid[name] = add_user(self.h.store, name)
        for name in NAMES:
            client = self.h.connect()
            self.token[name] = client.login(name).token
            self.client[name] = client
        self.drain()

    # -- helpers --------------------------------------------------------------

    def call(self, method: str, path: str, who: str | None, body: Any = None
             ) -> tuple[int, Any]:
        """``who``'s request: (status, JSON body or None)."""
        return self.h.http(method, path, self.token[who] if who else None, body)

    def ok(self, method: str, path: str, who: str, body: Any = None, status: int = 200) -> Any:
        """``who``'s request that must succeed with ``status``: its JSON."""
        code, answer = self.call(method, path, who, body)
        self.assertEqual(code, status, f"{method} {path}: {answer}")
        return answer

    def refused(self, method: str, path: str, who: str | None, body: Any, status: int,
                mentions: str = "") -> dict[str, Any]:
        """A request refused with ``status`` and a JSON error whose message
        mentions ``mentions``; the error object."""
        code, answer = self.call(method, path, who, body)
        self.assertEqual(code, status, f"{method} {path} {body!r}: {answer}")
        error: dict[str, Any] = answer["error"]
        self.assertEqual(set(error), {"code", "message"})
        self.assertIn(mentions, error["message"], f"{method} {path} {body!r}")
        return error

    def raw(self, method: str, path: str, who: str | None = None, body: Any = None,
            **headers: str) -> tuple[int, Headers, bytes]:
        """A request with extra headers (``if_none_match="..."``), answered
        as sent on the wire: (status, headers, undecoded body)."""
        agent = RequestTraversalAgent(self.h.site.resource)
        sent = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})
        if who is not None:
            sent.setRawHeaders(b"authorization", [f"Bearer {self.token[who]}".encode()])
        producer = None if body is None else _Body(json.dumps(body).encode())
        d = agent.request(method.encode(), b"http://im58d.test" + path.encode(), sent, producer)
        self.h.turn()
        agent.flush()
        response = self.successResultOf(d)
        content = readBody(response)
        agent.flush()
        return response.code, response.headers, self.successResultOf(content)

    def etag(self, path: str, who: str) -> str:
        code, headers, _ = self.raw("GET", path, who)
        self.assertEqual(code, 200, path)
        tags = headers.getRawHeaders(b"etag")
        assert tags is not None and len(tags) == 1, (path, tags)
        return tags[0].decode()

    def versions(self, who: str) -> dict[str, int]:
        answer: dict[str, int] = self.ok("GET", "/v1/versions", who)
        return answer

    def version(self, path: str, who: str) -> int:
        """The ``version`` of a list's GET."""
        answer: int = self.ok("GET", path, who)["version"]
        return answer

    def drain(self) -> None:
        for client in self.client.values():
            client.received()

    def changed(self, who: str) -> list[P.Changed]:
        """The CHANGED packets ``who`` got since the last look."""
        return [p for p in self.client[who].received() if isinstance(p, P.Changed)]

    def befriend(self, a: str, b: str, category_a: int = 0, category_b: int = 0) -> None:
        """``a`` asks ``b``, ``b`` accepts."""
        body: dict[str, Any] = {"uid": self.uid[b], "category": category_a}
        self.assertEqual(self.ok("POST", "/v1/friends", a, body, 202), {"requested": True})
        body = {"uid": self.uid[a], "category": category_b}
        self.assertEqual(self.ok("POST", "/v1/friends", b, body), {"friends": True})
        self.drain()

    def category(self, who: str, name: str) -> int:
        cid: int = self.ok("POST", "/v1/categories", who, {"name": name}, 201)["id"]
        self.drain()
        return cid

    def group(self, owner: str, *members: str, name: str = "g") -> int:
        body = {"name": name, "members": [self.uid[m] for m in members]}
        gid: int = self.ok("POST", "/v1/groups", owner, body, 201)["id"]
        self.drain()
        return gid

    def members(self, gid: int, who: str) -> list[int]:
        answer: list[int] = self.ok("GET", f"/v1/groups/{gid}/members", who)["members"]
        return answer

    def profile(self, who: str, of: str) -> dict[str, Any]:
        rows = self.ok("POST", "/v1/users/sync", who, {"have": {str(self.uid[of]): 0}})["users"]
        self.assertEqual(len(rows), 1)
        row: dict[str, Any] = rows[0]
        return row

    def small_site(self, max_members: int) -> None:
        """Serve HTTP from a tree whose groups hold ``max_members`` at most."""
        self.h.site = make_site(self.h.iplist, self.h.sessions, self.h.store, self.h.reactor,
                                max_members=max_members)
        self.h.treq = StubTreq(self.h.site.resource)


class VersionsTests(ListTestCase):
    def test_shape(self) -> None:
        """GET /v1/versions: the five list versions (friends, groups,
        categories, requests, devices), the caller's own row version ("me",
        as users/sync shows it) and the highest row versions among friends
        and groups (0 with none); all whole numbers."""
        versions = self.versions("alice")
        self.assertEqual(
            list(versions), ["friends", "groups", "categories", "requests", "devices", "me",
                             "friend_rows", "group_rows"]
        )
        self.assertEqual(versions["requests"], self.version("/v1/friends/requests", "alice"))
        self.assertEqual(versions["devices"], self.version("/v1/devices", "alice"))
        self.assertTrue(all(type(v) is int for v in versions.values()))
        self.assertEqual(versions["friend_rows"], 0)
        self.assertEqual(versions["group_rows"], 0)
        self.assertEqual(versions["me"], self.profile("alice", "alice")["version"])

    def test_etag_and_not_modified(self) -> None:
        """Its ETag is the versions joined with "-" in quotes; If-None-Match
        with it gets 304 and no body, an old tag gets the versions."""
        versions = self.versions("alice")
        tag = self.etag("/v1/versions", "alice")
        self.assertEqual(tag, f'"{"-".join(map(str, versions.values()))}"')
        code, headers, body = self.raw("GET", "/v1/versions", "alice", if_none_match=tag)
        self.assertEqual((code, body), (304, b""))
        self.assertEqual(headers.getRawHeaders(b"etag"), [tag.encode()])
        self.category("alice", "Work")
        code, _, body = self.raw("GET", "/v1/versions", "alice", if_none_match=tag)
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), self.versions("alice"))
        self.assertNotEqual(self.etag("/v1/versions", "alice"), tag)

    def test_unchanged_by_reads_and_strangers(self) -> None:
        """Reading, and changes among other users, leave the versions as
        they are."""
        before = self.versions("alice")
        for path in ("/v1/friends", "/v1/categories", "/v1/groups", "/v1/friends/requests"):
            self.ok("GET", path, "alice")
        self.ok("POST", "/v1/users/sync", "alice", {"have": {str(self.uid["alice"]): 0}})
        self.befriend("carol", "dave")
        self.group("carol", "dave")
        self.category("carol", "Work")
        self.ok("PATCH", "/v1/me", "carol", {"nick": "Caro"})
        self.assertEqual(self.versions("alice"), before)

    def test_friend_rows_follow_friends_details(self) -> None:
        """A friend's profile change raises friend_rows to the friend's new
        row version (the ETag moves); a stranger's does not."""
        self.befriend("alice", "bob")
        before = self.versions("alice")
        version = self.ok("PATCH", "/v1/me", "bob", {"gender": 2})["version"]
        after = self.versions("alice")
        self.assertEqual(after["friend_rows"], version)
        self.assertGreater(version, before["friend_rows"])
        self.assertEqual({**after, "friend_rows": 0}, {**before, "friend_rows": 0})
        self.ok("PATCH", "/v1/me", "carol", {"gender": 1})
        self.assertEqual(self.versions("alice"), after)

    def test_group_rows_follow_groups(self) -> None:
        """group_rows is the highest row version among the caller's groups:
        it moves when a group of theirs changes (a member joins)."""
        gid = self.group("alice", "bob")
        before = self.versions("alice")
        [row] = self.ok("POST", "/v1/groups/sync", "alice", {"have": {str(gid): 0}})["groups"]
        self.assertEqual(before["group_rows"], row["version"])
        self.ok("POST", f"/v1/groups/{gid}/members", "bob", {"uid": self.uid["carol"]})
        self.assertGreater(self.versions("alice")["group_rows"], before["group_rows"])

    def test_offline_users_change_too(self) -> None:
        """Users with no connection (the token of a device that said BYE,
        or of one signed in over /v1/login only) change lists like the
        others; their versions move all the same."""
        self.client["dave"].send(P.Bye())
        before = self.versions("dave")
        self.befriend("carol", "dave")
        self.assertGreater(self.versions("dave")["friends"], before["friends"])
        _, login = self.call("POST", "/v1/login", None, {
            "user": "dave", "password": "pw", "device_id": b64(named_device("dave-web"))})
        self.token["dave"] = login["token"]
        before = self.versions("dave")
        self.befriend("bob", "dave")
        self.assertGreater(self.versions("dave")["friends"], before["friends"])


class ListReadTests(ListTestCase):
    def test_lists_etag_is_version(self) -> None:
        """Every list (friends, categories, groups, a group's members)
        answers with the ETag of its version in quotes, and If-None-Match
        with it (alone, weak, or among others) gets 304 and no body."""
        gid = self.group("alice", "bob")
        for path in ("/v1/friends", "/v1/categories", "/v1/groups", f"/v1/groups/{gid}/members"):
            tag = self.etag(path, "alice")
            self.assertEqual(tag, f'"{self.version(path, "alice")}"', path)
            for header in (tag, f"W/{tag}", f'"12345", {tag}'):
                code, _, body = self.raw("GET", path, "alice", if_none_match=header)
                self.assertEqual((code, body), (304, b""), (path, header))
            code, _, body = self.raw("GET", path, "alice", if_none_match='"12345"')
            self.assertEqual(code, 200, path)
            self.assertEqual(json.loads(body), self.ok("GET", path, "alice"))

    def test_fresh_lists(self) -> None:
        """A new user's lists are empty, each at version 1."""
        self.assertEqual(self.ok("GET", "/v1/friends", "alice"), {"version": 1, "friends": []})
        self.assertEqual(self.ok("GET", "/v1/categories", "alice"),
                         {"version": 1, "categories": []})
        self.assertEqual(self.ok("GET", "/v1/groups", "alice"), {"version": 1, "groups": []})
        self.assertEqual(self.ok("GET", "/v1/friends/requests", "alice"),
                         {"version": 1, "requests": []})

    def test_lists_shapes(self) -> None:
        """friends: [[uid, category]] by uid; categories: [[id, name]];
        groups: gids; members: uids."""
        work = self.category("alice", "Work")
        self.befriend("alice", "carol", category_a=work)
        self.befriend("alice", "bob")
        self.assertEqual(
            self.ok("GET", "/v1/friends", "alice")["friends"],
            [[self.uid["bob"], 0], [self.uid["carol"], work]],
        )
        self.assertEqual(self.ok("GET", "/v1/categories", "alice")["categories"], [[work, "Work"]])
        first = self.group("alice", "bob")
        second = self.group("carol", "alice")
        self.assertEqual(self.ok("GET", "/v1/groups", "alice")["groups"], sorted([first, second]))
        self.assertEqual(self.members(second, "alice"),
                         sorted([self.uid["alice"], self.uid["carol"]]))

    def test_trailing_slash(self) -> None:
        """A trailing slash names the same resource."""
        self.assertEqual(self.ok("GET", "/v1/friends/", "alice"),
                         self.ok("GET", "/v1/friends", "alice"))


class SyncTests(ListTestCase):
    def test_users_sync_only_newer(self) -> None:
        """users/sync returns the details of users whose row is newer than
        the version the client has (0: none), nothing for the others."""
        self.befriend("alice", "bob")
        self.befriend("alice", "carol")
        ids = {str(self.uid[n]): 0 for n in ("alice", "bob", "carol")}
        rows = self.ok("POST", "/v1/users/sync", "alice", {"have": ids})["users"]
        self.assertEqual(sorted(r["id"] for r in rows), sorted(map(int, ids)))
        bob = next(r for r in rows if r["id"] == self.uid["bob"])
        self.assertEqual(bob, {"id": self.uid["bob"], "nick": "bob", "gender": 0,
                               "birthday": None, "version": bob["version"]})
        have = {str(r["id"]): r["version"] for r in rows}
        self.assertEqual(self.ok("POST", "/v1/users/sync", "alice", {"have": have}),
                         {"users": []})
        self.ok("PATCH", "/v1/me", "bob", {"nick": "Bobby"})
        [row] = self.ok("POST", "/v1/users/sync", "alice", {"have": have})["users"]
        self.assertEqual((row["id"], row["nick"]), (self.uid["bob"], "Bobby"))
        self.assertGreater(row["version"], bob["version"])
        newer = {str(self.uid["bob"]): row["version"] + 1}
        self.assertEqual(self.ok("POST", "/v1/users/sync", "alice", {"have": newer}),
                         {"users": []})

    def test_users_sync_circle(self) -> None:
        """A user sees the details of themselves, friends, members of a
        shared group, and users who asked to be their friend (not those they
        asked: a request reveals its sender only); never those of a user
        outside that circle, nor of unknown ids."""
        self.befriend("alice", "bob")
        self.ok("POST", "/v1/friends", "carol", {"uid": self.uid["dave"]}, 202)
        self.group("bob", "dave")
        everyone = {str(self.uid[n]): 0 for n in NAMES} | {"999": 0}
        sees = {
            "alice": {"alice", "bob"},
            "bob": {"bob", "alice", "dave"},
            "carol": {"carol"},
            "dave": {"dave", "carol", "bob"},
        }
        for who, names in sees.items():
            rows = self.ok("POST", "/v1/users/sync", who, {"have": everyone})["users"]
            self.assertEqual({r["id"] for r in rows}, {self.uid[n] for n in names}, who)

    def test_users_sync_circle_shrinks(self) -> None:
        """A former friend and a former group mate are outside the circle
        again."""
        self.befriend("alice", "bob")
        gid = self.group("alice", "carol")
        self.ok("DELETE", f"/v1/friends/{self.uid['bob']}", "alice", status=204)
        self.ok("DELETE", f"/v1/groups/{gid}/members/{self.uid['carol']}", "alice")
        have = {str(self.uid["bob"]): 0, str(self.uid["carol"]): 0}
        self.assertEqual(self.ok("POST", "/v1/users/sync", "alice", {"have": have}),
                         {"users": []})

    def test_groups_sync(self) -> None:
        """groups/sync returns details of the caller's groups newer than the
        client's versions; groups the caller is not in never, unknown gids
        never."""
        mine = self.group("alice", "bob", name="mine")
        theirs = self.group("carol", "dave", name="theirs")
        have = {str(mine): 0, str(theirs): 0, "999": 0}
        [row] = self.ok("POST", "/v1/groups/sync", "alice", {"have": have})["groups"]
        self.assertEqual(row, {"id": mine, "name": "mine", "intro": "", "owner": self.uid["alice"],
                               "members_version": row["version"], "version": row["version"]})
        self.assertEqual(self.ok("POST", "/v1/groups/sync", "carol", {"have": have})["groups"],
                         [{"id": theirs, "name": "theirs", "intro": "", "owner": self.uid["carol"],
                           "members_version": row["version"] + 1,
                           "version": row["version"] + 1}])
        current = {str(mine): row["version"], str(theirs): 0}
        self.assertEqual(self.ok("POST", "/v1/groups/sync", "alice", {"have": current}),
                         {"groups": []})
        self.ok("POST", f"/v1/groups/{mine}/members", "bob", {"uid": self.uid["carol"]})
        [newer] = self.ok("POST", "/v1/groups/sync", "alice", {"have": current})["groups"]
        self.assertGreater(newer["version"], row["version"])
        self.assertGreater(newer["members_version"], row["members_version"])

    def test_sync_bad_bodies(self) -> None:
        """A sync body without a "have" object of id: version (whole numbers
        0 or more) is a 400 whose message names "have"; over 2,000 entries
        is a 413."""
        bad: list[Any] = [
            {}, {"have": None}, {"have": []}, {"have": "1"}, {"have": {"abc": 0}},
            {"have": {"-1": 0}}, {"have": {"1.5": 0}}, {"have": {"": 0}},
            {"have": {"1" * 19: 0}}, {"have": {"1": -1}}, {"have": {"1": "1"}},
            {"have": {"1": 1.5}}, {"have": {"1": True}}, {"have": {"1": None}},
            {"have": {"1": 1 << 63}},
        ]
        for path in ("/v1/users/sync", "/v1/groups/sync"):
            for body in bad:
                self.refused("POST", path, "alice", body, 400, "'have'")
            self.refused("POST", path, "alice", [1], 400)
            too_many = {"have": {str(n): 0 for n in range(1, MAX_HAVE + 2)}}
            self.refused("POST", path, "alice", too_many, 413, "'have'")
            enough = {"have": {str(n): 0 for n in range(1, MAX_HAVE + 1)}}
            self.assertEqual(self.call("POST", path, "alice", enough)[0], 200)


class ProfileTests(ListTestCase):
    def test_patch_me(self) -> None:
        """PATCH /v1/me sets nick (trimmed), gender and birthday, answers
        the row's new version, which "me" in /v1/versions and users/sync
        show; a friend's friend_rows follows."""
        self.befriend("alice", "bob")
        before = self.versions("alice")
        bob_before = self.versions("bob")
        answer = self.ok("PATCH", "/v1/me", "alice",
                         {"nick": "  Alice A. ", "gender": 2, "birthday": "1990-02-28"})
        self.assertEqual(list(answer), ["version"])
        self.assertGreater(answer["version"], before["me"])
        self.assertEqual(self.versions("alice")["me"], answer["version"])
        self.assertEqual(self.versions("bob")["friend_rows"], answer["version"])
        self.assertGreater(answer["version"], bob_before["friend_rows"])
        self.assertEqual(self.profile("bob", "alice"),
                         {"id": self.uid["alice"], "nick": "Alice A.", "gender": 2,
                          "birthday": "1990-02-28", "version": answer["version"]})
        second = self.ok("PATCH", "/v1/me", "alice", {"birthday": None})["version"]
        self.assertGreater(second, answer["version"])
        self.assertEqual(self.profile("alice", "alice")["birthday"], None)
        self.assertEqual(self.profile("alice", "alice")["nick"], "Alice A.")

    def test_patch_me_refused(self) -> None:
        """A bad value is a 400 naming its field, as are an unknown field
        and an empty body; nothing changes."""
        before = self.profile("alice", "alice")
        cases: list[tuple[Any, str]] = [
            ({}, "nothing to change"),
            ({"name": "x"}, "'name'"),
            ({"nick": "x", "avatar": "y"}, "'avatar'"),
            ({"nick": ""}, "'nick'"),
            ({"nick": "   "}, "'nick'"),
            ({"nick": "x" * 65}, "'nick'"),
            ({"nick": 5}, "'nick'"),
            ({"nick": None}, "'nick'"),
            ({"gender": 4}, "'gender'"),
            ({"gender": -1}, "'gender'"),
            ({"gender": "1"}, "'gender'"),
            ({"gender": True}, "'gender'"),
            ({"birthday": "2020-02-30"}, "'birthday'"),
            ({"birthday": "2020/01/01"}, "'birthday'"),
            ({"birthday": "20200101"}, "'birthday'"),
            ({"birthday": "1.1.2020"}, "'birthday'"),
            ({"birthday": 19900101}, "'birthday'"),
            ({"nick": "ok", "gender": 9}, "'gender'"),
        ]
        for body, mentions in cases:
            self.refused("PATCH", "/v1/me", "alice", body, 400, mentions)
        self.refused("PATCH", "/v1/me", "alice", ["nick"], 400)
        self.assertEqual(self.profile("alice", "alice"), before)
        self.ok("PATCH", "/v1/me", "alice", {"nick": "x" * 64, "gender": 3})

    def test_birthday_is_a_calendar_date(self) -> None:
        """A birthday is YYYY-MM-DD: an ISO week date of the same length is
        refused, not stored as the user's birthday."""
        self.refused("PATCH", "/v1/me", "alice", {"birthday": "2020-W01-1"}, 400, "'birthday'")
        self.assertEqual(self.profile("alice", "alice")["birthday"], None)



class FriendTests(ListTestCase):
    def test_request_and_accept(self) -> None:
        """A request is 202 {"requested": true} and shows in the other's
        GET /v1/friends/requests; their POST accepts it: both are friends,
        filed under the category each chose, both friend list versions move
        and both connected users get CHANGED friends with the new version
        (the one who accepted CHANGED requests too: the request is gone)."""
        work = self.category("alice", "Work")
        family = self.category("bob", "Family")
        before = {n: self.version("/v1/friends", n) for n in ("alice", "bob")}
        answer = self.ok("POST", "/v1/friends", "alice",
                         {"uid": self.uid["bob"], "category": work}, 202)
        self.assertEqual(answer, {"requested": True})
        requests = self.ok("GET", "/v1/friends/requests", "bob")
        self.assertEqual(requests["requests"], [{"uid": self.uid["alice"], "ts": NOW}])
        self.assertEqual(self.ok("GET", "/v1/friends/requests", "alice")["requests"], [])
        # a request alone changes no friend list
        self.assertEqual({n: self.version("/v1/friends", n) for n in before}, before)
        self.assertEqual(self.changed("alice"), [])
        self.assertEqual(self.changed("bob"), [P.Changed("requests", requests["version"])])

        answer = self.ok("POST", "/v1/friends", "bob",
                         {"uid": self.uid["alice"], "category": family})
        self.assertEqual(answer, {"friends": True})
        alice = self.ok("GET", "/v1/friends", "alice")
        bob = self.ok("GET", "/v1/friends", "bob")
        self.assertEqual(alice["friends"], [[self.uid["bob"], work]])
        self.assertEqual(bob["friends"], [[self.uid["alice"], family]])
        self.assertGreater(alice["version"], before["alice"])
        self.assertGreater(bob["version"], before["bob"])
        after = self.ok("GET", "/v1/friends/requests", "bob")
        self.assertEqual(after["requests"], [])
        self.assertGreater(after["version"], requests["version"])
        self.assertEqual(self.changed("alice"), [P.Changed("friends", alice["version"])])
        self.assertEqual(self.changed("bob"), [P.Changed("friends", bob["version"]),
                                               P.Changed("requests", after["version"])])
        self.assertEqual(self.changed("carol"), [])

    def test_asking_again_replaces_the_request(self) -> None:
        """Asking twice leaves one pending request, with the later time."""
        self.ok("POST", "/v1/friends", "alice", {"uid": self.uid["bob"]}, 202)
        self.h.reactor.advance(30)
        self.ok("POST", "/v1/friends", "alice", {"uid": self.uid["bob"]}, 202)
        self.assertEqual(self.ok("GET", "/v1/friends/requests", "bob")["requests"],
                         [{"uid": self.uid["alice"], "ts": NOW + 30}])

    def test_requests_oldest_first(self) -> None:
        """Pending requests are listed oldest first."""
        self.ok("POST", "/v1/friends", "carol", {"uid": self.uid["alice"]}, 202)
        self.h.reactor.advance(5)
        self.ok("POST", "/v1/friends", "bob", {"uid": self.uid["alice"]}, 202)
        self.assertEqual(self.ok("GET", "/v1/friends/requests", "alice")["requests"],
                         [{"uid": self.uid["carol"], "ts": NOW},
                          {"uid": self.uid["bob"], "ts": NOW + 5}])

    def test_request_refused(self) -> None:
        """Befriending oneself is 400, an unknown user 404, a friend 409, a
        category that is not the caller's 404, a missing or bad uid 400
        naming it; no refusal changes a list."""
        self.befriend("alice", "bob")
        theirs = self.category("carol", "Work")
        before = self.versions("alice")
        self.refused("POST", "/v1/friends", "alice", {"uid": self.uid["alice"]}, 400)
        self.refused("POST", "/v1/friends", "alice", {"uid": 999}, 404, "999")
        self.refused("POST", "/v1/friends", "alice", {"uid": self.uid["bob"]}, 409)
        self.refused("POST", "/v1/friends", "bob", {"uid": self.uid["alice"]}, 409)
        self.refused("POST", "/v1/friends", "alice",
                     {"uid": self.uid["dave"], "category": 999}, 404, "999")
        self.refused("POST", "/v1/friends", "alice",
                     {"uid": self.uid["dave"], "category": theirs}, 404)
        self.refused("POST", "/v1/friends", "alice", {}, 400, "'uid'")
        self.refused("POST", "/v1/friends", "alice", {"uid": "2"}, 400, "'uid'")
        self.refused("POST", "/v1/friends", "alice",
                     {"uid": self.uid["dave"], "category": "x"}, 400, "'category'")
        self.assertEqual(self.versions("alice"), before)
        self.assertEqual(self.ok("GET", "/v1/friends/requests", "dave"),
                         {"version": 1, "requests": []})
        self.assertEqual(self.changed("dave"), [])

    def test_remove_friend_both_ways(self) -> None:
        """DELETE /v1/friends/<uid> is 204 and ends the friendship on both
        sides: both lists move and both users get CHANGED; again is 404,
        as is removing a user who never was a friend."""
        self.befriend("alice", "bob")
        before = {n: self.version("/v1/friends", n) for n in ("alice", "bob")}
        code, answer = self.call("DELETE", f"/v1/friends/{self.uid['alice']}", "bob")
        self.assertEqual((code, answer), (204, None))
        for name in before:
            listed = self.ok("GET", "/v1/friends", name)
            self.assertEqual(listed["friends"], [])
            self.assertGreater(listed["version"], before[name])
            self.assertEqual(self.changed(name), [P.Changed("friends", listed["version"])])
        self.refused("DELETE", f"/v1/friends/{self.uid['bob']}", "alice", None, 404)
        self.refused("DELETE", f"/v1/friends/{self.uid['carol']}", "alice", None, 404)
        self.refused("DELETE", "/v1/friends/999", "alice", None, 404)

    def test_file_under_category(self) -> None:
        """PUT /v1/friends/<uid> {"category"} files a friend on the caller's
        side only (0: none) and answers the friend list's new version,
        which CHANGED carries; an unknown category or a non-friend is 404."""
        self.befriend("alice", "bob")
        work = self.category("alice", "Work")
        bob_version = self.version("/v1/friends", "bob")
        answer = self.ok("PUT", f"/v1/friends/{self.uid['bob']}", "alice", {"category": work})
        self.assertEqual(list(answer), ["version"])
        listed = self.ok("GET", "/v1/friends", "alice")
        self.assertEqual(listed, {"version": answer["version"],
                                  "friends": [[self.uid["bob"], work]]})
        self.assertEqual(self.changed("alice"), [P.Changed("friends", answer["version"])])
        self.assertEqual(self.changed("bob"), [])
        self.assertEqual(self.ok("GET", "/v1/friends", "bob"),
                         {"version": bob_version, "friends": [[self.uid["alice"], 0]]})
        again = self.ok("PUT", f"/v1/friends/{self.uid['bob']}", "alice", {"category": 0})
        self.assertGreater(again["version"], answer["version"])
        self.assertEqual(self.ok("GET", "/v1/friends", "alice")["friends"],
                         [[self.uid["bob"], 0]])
        self.refused("PUT", f"/v1/friends/{self.uid['bob']}", "alice", {"category": 999}, 404)
        self.refused("PUT", f"/v1/friends/{self.uid['carol']}", "alice", {"category": 0}, 404)
        self.refused("PUT", f"/v1/friends/{self.uid['bob']}", "alice", {}, 400, "'category'")
        self.assertEqual(self.version("/v1/friends", "alice"), again["version"])

    def test_presence_follows_new_friends(self) -> None:
        """A friendship made over HTTP reaches presence at once: when the new
        friend logs out, the connected user is told."""
        self.befriend("alice", "bob")
        self.client["bob"].send(P.Bye())
        self.assertEqual(self.client["alice"].received(), [P.Presence(self.uid["bob"], False)])


class RequestListTests(ListTestCase):
    """GET /v1/friends/requests has a version, an ETag and CHANGED notices
    like every other list: the receiver's version moves when a request to
    them is made, withdrawn, declined or accepted."""

    def requests(self, who: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.ok("GET", "/v1/friends/requests", who)
        self.assertEqual(set(answer), {"version", "requests"})
        return answer

    def assert_moved(self, who: str, before: int, pending: list[str]) -> int:
        """``who``'s request list moved past ``before``, holds requests from
        ``pending``, and ``who``'s every connected device got CHANGED
        "requests" with the new version, once; the new version."""
        after = self.requests(who)
        self.assertGreater(after["version"], before)
        self.assertEqual([r["uid"] for r in after["requests"]], [self.uid[n] for n in pending])
        self.assertEqual(self.changed(who), [P.Changed("requests", after["version"])])
        self.assertEqual(self.versions(who)["requests"], after["version"])
        return int(after["version"])

    def test_etag_and_not_modified(self) -> None:
        """The list answers with the ETag of its version; If-None-Match
        with it is 304 without a body; a new request makes it 200 again."""
        tag = self.etag("/v1/friends/requests", "bob")
        self.assertEqual(tag, f'"{self.requests("bob")["version"]}"')
        code, _, body = self.raw("GET", "/v1/friends/requests", "bob", if_none_match=tag)
        self.assertEqual((code, body), (304, b""))
        self.ok("POST", "/v1/friends", "alice", {"uid": self.uid["bob"]}, 202)
        code, _, body = self.raw("GET", "/v1/friends/requests", "bob", if_none_match=tag)
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), self.requests("bob"))

    def test_new_request(self) -> None:
        """A new request moves the receiver's version (CHANGED "requests" to
        the receiver's connected devices, both of them); the sender's
        request list and everyone else's stay."""
        tablet = self.h.connect()
        tablet.login("bob", device=named_device("bob-tablet"))
        self.drain()
        before = {n: self.requests(n)["version"] for n in NAMES}
        self.ok("POST", "/v1/friends", "alice", {"uid": self.uid["bob"]}, 202)
        version = self.assert_moved("bob", before["bob"], ["alice"])
        self.assertEqual([p for p in tablet.received() if isinstance(p, P.Changed)],
                         [P.Changed("requests", version)])
        for name in ("alice", "carol", "dave"):
            self.assertEqual(self.requests(name)["version"], before[name])
            self.assertEqual(self.changed(name), [])

    def test_withdraw(self) -> None:
        """The sender withdrawing the request (DELETE /v1/friends/<uid>)
        moves the receiver's version and tells the receiver."""
        self.ok("POST", "/v1/friends", "alice", {"uid": self.uid["bob"]}, 202)
        before = self.requests("bob")["version"]
        self.drain()
        code, _ = self.call("DELETE", f"/v1/friends/{self.uid['bob']}", "alice")
        self.assertEqual(code, 204)
        self.assert_moved("bob", before, [])
        self.assertEqual(self.changed("alice"), [])

    def test_decline(self) -> None:
        """The receiver declining the request (DELETE /v1/friends/<uid>)
        moves the receiver's version; no friend list moves."""
        self.ok("POST", "/v1/friends", "carol", {"uid": self.uid["bob"]}, 202)
        self.ok("POST", "/v1/friends", "alice", {"uid": self.uid["bob"]}, 202)
        before = self.versions("bob")
        self.drain()
        code, _ = self.call("DELETE", f"/v1/friends/{self.uid['alice']}", "bob")
        self.assertEqual(code, 204)
        self.assert_moved("bob", before["requests"], ["carol"])
        self.assertEqual(self.versions("bob")["friends"], before["friends"])
        self.assertEqual(self.changed("alice") + self.changed("carol"), [])

    def test_accept(self) -> None:
        """Accepting (POST /v1/friends for the asking user) moves the
        receiver's request version besides both friend lists."""
        self.ok("POST", "/v1/friends", "alice", {"uid": self.uid["bob"]}, 202)
        before = self.requests("bob")["version"]
        alice_before = self.requests("alice")["version"]
        self.drain()
        self.ok("POST", "/v1/friends", "bob", {"uid": self.uid["alice"]})
        after = self.requests("bob")
        self.assertGreater(after["version"], before)
        self.assertEqual(after["requests"], [])
        self.assertEqual([p.what for p in self.changed("bob")], ["friends", "requests"])
        self.assertEqual([p.what for p in self.changed("alice")], ["friends"])
        self.assertEqual(self.requests("alice")["version"], alice_before)

    def test_refusals_move_nothing(self) -> None:
        """Refused requests and removals leave every request list as it is."""
        before = {n: self.requests(n)["version"] for n in NAMES}
        self.refused("POST", "/v1/friends", "alice", {"uid": 999}, 404)
        self.refused("POST", "/v1/friends", "alice", {"uid": self.uid["alice"]}, 400)
        self.refused("DELETE", f"/v1/friends/{self.uid['bob']}", "alice", None, 404)
        self.assertEqual({n: self.requests(n)["version"] for n in NAMES}, before)
        self.assertEqual([self.changed(n) for n in NAMES], [[]] * len(NAMES))


class CategoryTests(ListTestCase):
    def test_add_category(self) -> None:
        """POST /v1/categories is 201 {"id", "version"}; the list shows it
        under that version, which CHANGED categories carries."""
        before = self.version("/v1/categories", "alice")
        answer = self.ok("POST", "/v1/categories", "alice", {"name": " Work "}, 201)
        self.assertEqual(set(answer), {"id", "version"})
        self.assertGreater(answer["version"], before)
        self.assertEqual(self.ok("GET", "/v1/categories", "alice"),
                         {"version": answer["version"], "categories": [[answer["id"], "Work"]]})
        self.assertEqual(self.changed("alice"), [P.Changed("categories", answer["version"])])
        self.assertEqual(self.ok("GET", "/v1/categories", "bob")["categories"], [])

    def test_category_refused(self) -> None:
        """A name the caller has already (after trimming) is 409; a missing,
        blank, too long or non-string name is 400 naming it; refusals leave
        the version; another user may use the same name."""
        self.category("alice", "Work")
        version = self.version("/v1/categories", "alice")
        self.refused("POST", "/v1/categories", "alice", {"name": "Work"}, 409)
        self.refused("POST", "/v1/categories", "alice", {"name": "  Work"}, 409)
        for body in ({}, {"name": ""}, {"name": "   "}, {"name": "x" * 65}, {"name": 5}):
            self.refused("POST", "/v1/categories", "alice", body, 400, "'name'")
        self.assertEqual(self.version("/v1/categories", "alice"), version)
        self.assertEqual(self.changed("alice"), [])
        self.ok("POST", "/v1/categories", "bob", {"name": "Work"}, 201)

    def test_at_most_100_categories(self) -> None:
        """A user has at most 100 categories: the 101st is 409."""
        for n in range(100):
            self.ok("POST", "/v1/categories", "alice", {"name": f"c{n}"}, 201)
        self.refused("POST", "/v1/categories", "alice", {"name": "one more"}, 409)


class GroupTests(ListTestCase):
    def test_create_group(self) -> None:
        """POST /v1/groups is 201 {"id", "version"}: the caller owns it, the
        members are the caller and the others once each, every member's
        group list holds it and every connected member gets CHANGED groups."""
        before = {n: self.version("/v1/groups", n) for n in NAMES}
        body = {"name": " Team ", "intro": "we", "members": [self.uid["bob"], self.uid["carol"],
                                                             self.uid["bob"], self.uid["alice"]]}
        answer = self.ok("POST", "/v1/groups", "alice", body, 201)
        self.assertEqual(set(answer), {"id", "version"})
        gid = answer["id"]
        [row] = self.ok("POST", "/v1/groups/sync", "carol", {"have": {str(gid): 0}})["groups"]
        self.assertEqual(row, {"id": gid, "name": "Team", "intro": "we",
                               "owner": self.uid["alice"], "members_version": answer["version"],
                               "version": answer["version"]})
        self.assertEqual(self.members(gid, "bob"),
                         sorted(self.uid[n] for n in ("alice", "bob", "carol")))
        for name in ("alice", "bob", "carol"):
            groups = self.ok("GET", "/v1/groups", name)
            self.assertEqual(groups["groups"], [gid])
            self.assertGreater(groups["version"], before[name])
            self.assertEqual(self.changed(name), [P.Changed("groups", groups["version"])])
        self.assertEqual(self.version("/v1/groups", "dave"), before["dave"])
        self.assertEqual(self.changed("dave"), [])

    def test_create_group_refused(self) -> None:
        """An unknown member is 404 and creates nothing; a missing name,
        members that are not uids and an intro over 1,000 characters are
        400 naming the field."""
        before = self.versions("alice")
        self.refused("POST", "/v1/groups", "alice",
                     {"name": "g", "members": [self.uid["bob"], 999]}, 404, "999")
        for body, mentions in [
            ({}, "'name'"),
            ({"name": ""}, "'name'"),
            ({"name": "x" * 65}, "'name'"),
            ({"name": "g", "members": "2"}, "'members'"),
            ({"name": "g", "members": ["2"]}, "'members'"),
            ({"name": "g", "members": [0]}, "'members'"),
            ({"name": "g", "members": [True]}, "'members'"),
            ({"name": "g", "intro": 5}, "'intro'"),
            ({"name": "g", "intro": "x" * 1001}, "'intro'"),
        ]:
            self.refused("POST", "/v1/groups", "alice", body, 400, mentions)
        self.assertEqual(self.versions("alice"), before)
        self.assertEqual(self.versions("bob")["groups"], 1)
        self.assertEqual(self.changed("alice") + self.changed("bob"), [])

    def test_group_size_limit(self) -> None:
        """A group holds max_members users at most, the owner included:
        creating a bigger one is 409, adding to a full one is 409."""
        self.small_site(3)
        self.refused("POST", "/v1/groups", "alice",
                     {"name": "g", "members": [self.uid[n] for n in ("bob", "carol", "dave")]},
                     409, "3")
        gid = self.group("alice", "bob", "carol")
        version = self.version(f"/v1/groups/{gid}/members", "alice")
        self.refused("POST", f"/v1/groups/{gid}/members", "alice", {"uid": self.uid["dave"]},
                     409, "full")
        self.assertEqual(self.version(f"/v1/groups/{gid}/members", "alice"), version)
        self.ok("DELETE", f"/v1/groups/{gid}/members/{self.uid['carol']}", "alice")
        self.ok("POST", f"/v1/groups/{gid}/members", "bob", {"uid": self.uid["dave"]})

    def test_add_member(self) -> None:
        """Any member adds a user: the answer is the group's new
        members_version and version, the member list and its version move,
        the new member's group list holds the group and they get CHANGED."""
        gid = self.group("alice", "bob")
        members_before = self.version(f"/v1/groups/{gid}/members", "alice")
        carol_before = self.version("/v1/groups", "carol")
        answer = self.ok("POST", f"/v1/groups/{gid}/members", "bob", {"uid": self.uid["carol"]})
        [row] = self.ok("POST", "/v1/groups/sync", "alice", {"have": {str(gid): 0}})["groups"]
        self.assertEqual(answer, {"members_version": row["members_version"],
                                  "version": row["version"]})
        listed = self.ok("GET", f"/v1/groups/{gid}/members", "carol")
        everyone = sorted(self.uid[n] for n in ("alice", "bob", "carol"))
        self.assertEqual(listed, {"version": answer["members_version"], "members": everyone})
        self.assertGreater(listed["version"], members_before)
        groups = self.ok("GET", "/v1/groups", "carol")
        self.assertEqual(groups["groups"], [gid])
        self.assertGreater(groups["version"], carol_before)
        self.assertEqual(self.changed("carol"), [P.Changed("groups", groups["version"])])

    def test_add_member_refused(self) -> None:
        """Adding is for members (403 otherwise); an existing member is 409,
        an unknown user or group 404, a missing uid 400; nothing moves."""
        gid = self.group("alice", "bob")
        version = self.version(f"/v1/groups/{gid}/members", "alice")
        path = f"/v1/groups/{gid}/members"
        self.refused("POST", path, "carol", {"uid": self.uid["carol"]}, 403)
        self.refused("POST", path, "carol", {"uid": self.uid["dave"]}, 403)
        self.refused("POST", path, "alice", {"uid": self.uid["bob"]}, 409)
        self.refused("POST", path, "alice", {"uid": 999}, 404, "999")
        self.refused("POST", path, "alice", {}, 400, "'uid'")
        self.refused("POST", "/v1/groups/999/members", "alice", {"uid": self.uid["dave"]}, 404)
        self.assertEqual(self.version(path, "alice"), version)
        self.assertEqual(self.changed("carol") + self.changed("dave"), [])

    def test_members_for_members_only(self) -> None:
        """A group's members are for its members: 403 to others, 404 for an
        unknown group."""
        gid = self.group("alice", "bob")
        self.refused("GET", f"/v1/groups/{gid}/members", "carol", None, 403)
        self.refused("GET", "/v1/groups/999/members", "alice", None, 404)

    def test_leave(self) -> None:
        """A member leaves with DELETE of themselves: 204, the group leaves
        their list (CHANGED groups), the member list moves."""
        gid = self.group("alice", "bob", "carol")
        members = self.version(f"/v1/groups/{gid}/members", "alice")
        code, answer = self.call("DELETE", f"/v1/groups/{gid}/members/{self.uid['bob']}", "bob")
        self.assertEqual((code, answer), (204, None))
        groups = self.ok("GET", "/v1/groups", "bob")
        self.assertEqual(groups["groups"], [])
        self.assertEqual(self.changed("bob"), [P.Changed("groups", groups["version"])])
        listed = self.ok("GET", f"/v1/groups/{gid}/members", "alice")
        self.assertEqual(listed["members"], sorted([self.uid["alice"], self.uid["carol"]]))
        self.assertGreater(listed["version"], members)
        self.refused("GET", f"/v1/groups/{gid}/members", "bob", None, 403)
        self.assertEqual(self.ok("POST", "/v1/groups/sync", "bob", {"have": {str(gid): 0}}),
                         {"groups": []})

    def test_owner_removes(self) -> None:
        """The owner removes another member (200 with the new versions); a
        member who is not the owner may not (403); removing a non-member is
        404, an unknown group 404, a non-member caller 403."""
        gid = self.group("alice", "bob", "carol")
        self.refused("DELETE", f"/v1/groups/{gid}/members/{self.uid['carol']}", "bob", None, 403)
        self.refused("DELETE", f"/v1/groups/{gid}/members/{self.uid['alice']}", "bob", None, 403)
        self.refused("DELETE", f"/v1/groups/{gid}/members/{self.uid['dave']}", "alice", None, 404)
        self.refused("DELETE", f"/v1/groups/{gid}/members/{self.uid['dave']}", "dave", None, 403)
        self.refused("DELETE", f"/v1/groups/999/members/{self.uid['alice']}", "alice", None, 404)
        self.assertEqual(self.members(gid, "alice"),
                         sorted(self.uid[n] for n in ("alice", "bob", "carol")))
        answer = self.ok("DELETE", f"/v1/groups/{gid}/members/{self.uid['carol']}", "alice")
        [row] = self.ok("POST", "/v1/groups/sync", "alice", {"have": {str(gid): 0}})["groups"]
        self.assertEqual(answer, {"members_version": row["members_version"],
                                  "version": row["version"]})
        self.assertEqual(self.members(gid, "bob"), sorted([self.uid["alice"], self.uid["bob"]]))
        self.assertEqual(self.ok("GET", "/v1/groups", "carol")["groups"], [])
        self.assertEqual(len(self.changed("carol")), 1)

    def test_owner_leaving_hands_over(self) -> None:
        """An owner who leaves hands the group to the longest-standing
        member (not the lowest uid); the group's version moves."""
        gid = self.group("alice", "dave")
        self.h.reactor.advance(60)
        self.ok("POST", f"/v1/groups/{gid}/members", "alice", {"uid": self.uid["bob"]})
        [before] = self.ok("POST", "/v1/groups/sync", "bob", {"have": {str(gid): 0}})["groups"]
        self.ok("DELETE", f"/v1/groups/{gid}/members/{self.uid['alice']}", "alice", status=204)
        [after] = self.ok("POST", "/v1/groups/sync", "bob", {"have": {str(gid): 0}})["groups"]
        self.assertEqual(after["owner"], self.uid["dave"])
        self.assertGreater(after["version"], before["version"])
        # the new owner's power is real
        self.ok("DELETE", f"/v1/groups/{gid}/members/{self.uid['bob']}", "dave")

    def test_last_member_ends_the_group(self) -> None:
        """When the last member leaves, the group is gone: 404 for it."""
        gid = self.group("alice", "bob")
        self.ok("DELETE", f"/v1/groups/{gid}/members/{self.uid['bob']}", "bob", status=204)
        self.ok("DELETE", f"/v1/groups/{gid}/members/{self.uid['alice']}", "alice", status=204)
        self.assertEqual(self.ok("GET", "/v1/groups", "alice")["groups"], [])
        self.refused("GET", f"/v1/groups/{gid}/members", "alice", None, 404)
        self.refused("POST", f"/v1/groups/{gid}/members", "alice", {"uid": self.uid["bob"]}, 404)

    def test_ended_group_etag_never_answers_for_another(self) -> None:
        """A member list a client cached for a group that has ended is never
        confirmed (304) for a group created afterwards: gids are not reused."""
        old = self.group("alice")
        tag = self.etag(f"/v1/groups/{old}/members", "alice")
        self.ok("DELETE", f"/v1/groups/{old}/members/{self.uid['alice']}", "alice", status=204)
        new = self.group("alice", "bob")
        self.assertNotEqual(new, old)
        code, _, _ = self.raw("GET", f"/v1/groups/{new}/members", "alice", if_none_match=tag)
        self.assertEqual(code, 200)



class HTTPTests(ListTestCase):
    def test_gzip(self) -> None:
        """With Accept-Encoding: gzip a list answer (and a sync answer) of
        256 bytes or more is gzip-encoded and decodes to the same JSON; a
        smaller one is plain (gzip would make it bigger); a 304 stays empty."""
        self.befriend("alice", "bob")
        self.befriend("alice", "carol")
        self.befriend("alice", "dave")
        sync = {"have": {str(self.uid[n]): 0 for n in NAMES}}
        for method, path, body, encoding in [("GET", "/v1/friends", None, None),
                                             ("GET", "/v1/versions", None, None),
                                             ("POST", "/v1/users/sync", sync, [b"gzip"])]:
            code, headers, raw = self.raw(method, path, "alice", body, accept_encoding="gzip")
            self.assertEqual(code, 200)
            self.assertEqual(headers.getRawHeaders(b"content-encoding"), encoding, path)
            plain = gzip.decompress(raw) if encoding else raw
            self.assertEqual(json.loads(plain), self.ok(method, path, "alice", body), path)
            self.assertEqual(encoding is not None, len(plain) >= 256, path)
        tag = self.etag("/v1/friends", "alice")
        code, headers, raw = self.raw("GET", "/v1/friends", "alice",
                                      accept_encoding="gzip", if_none_match=tag)
        self.assertEqual((code, raw), (304, b""))

    def test_unauthorized(self) -> None:
        """Every list route answers 401 with WWW-Authenticate: Bearer without
        a token or with a wrong one, before looking at the body."""
        self.token["mallory"] = "not-a-token"
        for method, path, body in AUTHENTICATED:
            code, headers, raw = self.raw(method, path, None, body)
            self.assertEqual(code, 401, f"{method} {path}")
            self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b"Bearer"])
            self.assertEqual(json.loads(raw)["error"]["code"], "unauthorized")
            self.assertEqual(self.call(method, path, "mallory", body)[0], 401, f"{method} {path}")
            self.assertEqual(self.call(method, path, None, [])[0], 401, f"{method} {path}")

    def test_wrong_method(self) -> None:
        """A method a path does not have is a JSON 405 whose Allow lists the
        methods it has."""
        for method, path, allowed in [
            ("POST", "/v1/versions", "GET"),
            ("DELETE", "/v1/friends", "GET, POST"),
            ("POST", "/v1/friends/requests", "GET"),
            ("GET", "/v1/friends/2", "DELETE, PUT"),
            ("PUT", "/v1/categories", "GET, POST"),
            ("DELETE", "/v1/groups", "GET, POST"),
            ("GET", "/v1/groups/sync", "POST"),
            ("PUT", "/v1/groups/1/members", "GET, POST"),
            ("GET", "/v1/groups/1/members/2", "DELETE"),
            ("GET", "/v1/users/sync", "POST"),
            ("GET", "/v1/me", "PATCH"),
        ]:
            code, headers, raw = self.raw(method, path, "alice")
            self.assertEqual(code, 405, f"{method} {path}")
            [allow] = headers.getRawHeaders(b"allow", [b""])
            # HEAD goes with GET (JSONResource lists it, Routed does not yet)
            listed = {m.strip() for m in allow.decode().split(",")} - {"HEAD"}
            self.assertEqual(listed, set(allowed.split(", ")), path)
            self.assertEqual(json.loads(raw)["error"]["code"], "method_not_allowed")

    def test_unknown_paths(self) -> None:
        """Paths below the list resources that name nothing are JSON 404s."""
        for path in ["/v1/friends/abc", "/v1/friends/-1", "/v1/friends/1/2",
                     "/v1/friends/" + "9" * 19, "/v1/friends/requests/1",
                     "/v1/versions/x", "/v1/categories/1", "/v1/groups/abc/members",
                     "/v1/groups/1", "/v1/groups/1/nothing", "/v1/groups/1/members/x",
                     "/v1/groups/sync/1", "/v1/users", "/v1/users/1", "/v1/me/x",
                     "/v1/friends//1"]:
            for method in ("GET", "POST"):
                code, answer = self.call(method, path, "alice", {})
                self.assertEqual(code, 404, f"{method} {path}")
                self.assertEqual(answer["error"]["code"], "not_found", path)

    def test_head(self) -> None:
        """HEAD of a list is answered like GET, without a body."""
        code, headers, raw = self.raw("HEAD", "/v1/friends", "alice")
        self.assertEqual((code, raw), (200, b""))
        self.assertEqual(headers.getRawHeaders(b"etag"), [b'"1"'])
