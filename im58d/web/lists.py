"""The lists and details a client keeps in its cache (PROTOCOL.md section 2):
versions, friends and their categories, groups and their members, profiles.

Reads answer with an ``ETag`` of the version and honour ``If-None-Match``;
changes bump versions in the store and tell the connected users whose lists
moved (CHANGED) at once.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from ..store import interfaces as store_errors
from ..store.interfaces import IStore
from .inbox import StoreResource
from .resource import HTTPError, Routed, field, json_body, not_modified, respond

log = Logger()

# entries of a sync's "have" (a user has 500 friends or group members at most
# by default; a client asks for what is on screen)
MAX_HAVE = 2000
MAX_NAME = 64  # characters of a nick, category or group name
MAX_INTRO = 1000
GENDERS = range(4)  # 0 unknown, 1 male, 2 female, 3 other

_STATUS = (
    (store_errors.NotFound, 404, "not_found"),
    (store_errors.Forbidden, 403, "forbidden"),
    (store_errors.Conflict, 409, "conflict"),
    (store_errors.Invalid, 400, "bad_request"),
)


def _store_error(failure: Failure) -> Any:
    """The store's refusals as HTTP errors; anything else stays a failure."""
    for kind, status, code in _STATUS:
        if failure.check(kind):
            raise HTTPError(status, code, str(failure.value))
    return failure


def _name(body: dict[str, Any], key: str, required: bool = True, limit: int = MAX_NAME) -> Any:
    value = field(body, key, str, required)
    if value is None:
        return None
    value = value.strip()
    if not 1 <= len(value) <= limit:
        raise HTTPError(400, "bad_request", f"field {key!r} must be 1 to {limit} characters")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise HTTPError(400, "bad_request", f"field {key!r} must not hold control characters")
    return value


def _have(body: dict[str, Any]) -> dict[int, int]:
    have = field(body, "have", dict)
    if len(have) > MAX_HAVE:
        raise HTTPError(413, "too_large", f"at most {MAX_HAVE} entries in 'have'")
    parsed: dict[int, int] = {}
    for key, version in have.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 18):
            raise HTTPError(400, "bad_request", f"'have' keys must be ids, not {key[:20]!r}")
        if type(version) is not int or not 0 <= version < 1 << 63:
            raise HTTPError(400, "bad_request", f"'have' of {key} must be a version (0 or more)")
        parsed[int(key)] = version
    return parsed


class ListResource(Routed, StoreResource):
    def __init__(self, sessions: Any, store: IStore, clock: Any) -> None:
        super().__init__(sessions, store)
        self.clock = clock

    def now(self) -> int:
        return int(self.clock.seconds())

    def moved(self, uids: list[int]) -> None:
        """CHANGED to the connected devices of ``uids``."""
        if uids:
            d = self.sessions.lists_moved(uids)
            d.addErrback(lambda f: log.failure("CHANGED to {uids}", f, uids=uids))

    @staticmethod
    def listed(request: Request, key: str, result: tuple[int, Any]) -> bytes:
        version, items = result
        if not_modified(request, version):
            return b""
        return respond(request, {"version": version, key: items})


class VersionsResource(ListResource):
    """``GET /v1/versions``: one tiny answer for a warm sync."""

    routes = (((), "render"),)

    def render_GET(self, request: Request) -> Deferred[bytes]:
        d = self.store.versions(self.session(request).uid)
        return d.addCallback(self._render, request)

    @staticmethod
    def _render(versions: dict[str, int], request: Request) -> bytes:
        if not_modified(request, "-".join(map(str, versions.values()))):
            return b""
        return respond(request, versions)


class FriendsResource(ListResource):
    """``/v1/friends``: ids with categories, requests, accept, remove, file."""

    routes = (((), "list"), (("requests",), "requests"), ((int,), "friend"))

    def list_GET(self, request: Request) -> Deferred[bytes]:
        d = self.store.friends(self.session(request).uid)
        return d.addCallback(lambda result: self.listed(request, "friends", result))

    def list_POST(self, request: Request) -> Deferred[bytes]:
        uid = self.session(request).uid
        body = json_body(request)
        other = field(body, "uid", int)
        category = field(body, "category", int, required=False) or 0
        d = self.store.request_friend(uid, other, category, self.now())

        def answered(result: tuple[bool, list[int]]) -> bytes:
            friends, moved = result
            self.moved(moved)
            if friends:
                return respond(request, {"friends": True})
            return respond(request, {"requested": True}, 202)

        return d.addCallbacks(answered, _store_error)

    def requests_GET(self, request: Request) -> Deferred[bytes]:
        d = self.store.friend_requests(self.session(request).uid)
        return d.addCallback(lambda result: self.listed(request, "requests", result))

    def friend_DELETE(self, request: Request, other: int) -> Deferred[bytes]:
        d = self.store.remove_friend(self.session(request).uid, other)
        return d.addCallbacks(self._moved, _store_error, callbackArgs=(request,))

    def friend_PUT(self, request: Request, other: int) -> Deferred[bytes]:
        uid = self.session(request).uid
        category = field(json_body(request), "category", int)
        d = self.store.set_category(uid, other, category)

        def filed(version: int) -> bytes:
            self.moved([uid])
            return respond(request, {"version": version})

        return d.addCallbacks(filed, _store_error)

    def _moved(self, uids: list[int], request: Request) -> bytes:
        self.moved(uids)
        request.setResponseCode(204)
        return b""


class CategoriesResource(ListResource):
    routes = (((), "list"),)

    def list_GET(self, request: Request) -> Deferred[bytes]:
        d = self.store.categories(self.session(request).uid)
        return d.addCallback(lambda result: self.listed(request, "categories", result))

    def list_POST(self, request: Request) -> Deferred[bytes]:
        uid = self.session(request).uid
        name = _name(json_body(request), "name")
        d = self.store.add_category(uid, name)

        def added(result: tuple[int, int]) -> bytes:
            self.moved([uid])
            return respond(request, {"id": result[0], "version": result[1]}, 201)

        return d.addCallbacks(added, _store_error)


class GroupsResource(ListResource):
    """``/v1/groups``: ids, create, sync, members."""

    routes = (
        ((), "list"),
        (("sync",), "sync"),
        ((int, "members"), "members"),
        ((int, "members", int), "member"),
    )

    def __init__(self, sessions: Any, store: IStore, clock: Any, max_members: int) -> None:
        super().__init__(sessions, store, clock)
        self.max_members = max_members

    def list_GET(self, request: Request) -> Deferred[bytes]:
        d = self.store.groups(self.session(request).uid)
        return d.addCallback(lambda result: self.listed(request, "groups", result))

    def list_POST(self, request: Request) -> Deferred[bytes]:
        uid = self.session(request).uid
        body = json_body(request)
        name = _name(body, "name")
        intro = field(body, "intro", str, required=False) or ""
        if len(intro) > MAX_INTRO:
            raise HTTPError(400, "bad_request", f"field 'intro' is over {MAX_INTRO} characters")
        members = field(body, "members", list, required=False) or []
        if not all(type(m) is int and 0 < m < 1 << 63 for m in members):
            raise HTTPError(400, "bad_request", "field 'members' must be uids")
        if len(set(members) | {uid}) > self.max_members:
            raise HTTPError(409, "conflict", f"a group has at most {self.max_members} members")
        d = self.store.new_group(uid, name, intro, members, self.max_members, self.now())

        def created(result: tuple[int, int, list[int]]) -> bytes:
            gid, version, moved = result
            self.moved(moved)
            return respond(request, {"id": gid, "version": version}, 201)

        return d.addCallbacks(created, _store_error)

    def sync_POST(self, request: Request) -> Deferred[bytes]:
        uid = self.session(request).uid
        have = _have(json_body(request))
        d = self.store.groups_sync(uid, have)
        return d.addCallback(lambda rows: respond(request, {"groups": rows}))

    def members_GET(self, request: Request, gid: int) -> Deferred[bytes]:
        d = self.store.members(self.session(request).uid, gid)
        d.addCallback(lambda result: self.listed(request, "members", result))
        return d.addErrback(_store_error)

    def members_POST(self, request: Request, gid: int) -> Deferred[bytes]:
        uid = self.session(request).uid
        new = field(json_body(request), "uid", int)
        d = self.store.add_member(uid, gid, new, self.max_members, self.now())
        return d.addCallbacks(self._members_moved, _store_error, callbackArgs=(request,))

    def member_DELETE(self, request: Request, gid: int, target: int) -> Deferred[bytes]:
        uid = self.session(request).uid
        d = self.store.remove_member(uid, gid, target)
        return d.addCallbacks(self._members_moved, _store_error,
                              callbackArgs=(request, target == uid))

    def _members_moved(self, result: tuple[list[int], int, int], request: Request,
                       left: bool = False) -> bytes:
        moved, members_version, version = result
        self.moved(moved)
        if left:  # the group is none of the caller's business any more
            request.setResponseCode(204)
            return b""
        return respond(request, {"members_version": members_version, "version": version})


class UsersResource(ListResource):
    routes = ((("sync",), "sync"),)

    def sync_POST(self, request: Request) -> Deferred[bytes]:
        uid = self.session(request).uid
        have = _have(json_body(request))
        d = self.store.users_sync(uid, have)
        return d.addCallback(lambda rows: respond(request, {"users": rows}))


class MeResource(ListResource):
    routes = (((), "me"),)

    def me_PATCH(self, request: Request) -> Deferred[bytes]:
        uid = self.session(request).uid
        body = json_body(request)
        unknown = set(body) - {"nick", "gender", "birthday"}
        if unknown:
            raise HTTPError(400, "bad_request", f"unknown field {sorted(unknown)[0]!r}")
        changes: dict[str, Any] = {}
        if "nick" in body:
            changes["nick"] = _name(body, "nick")
        if "gender" in body:
            gender = field(body, "gender", int)
            if gender not in GENDERS:
                raise HTTPError(400, "bad_request",
                                "field 'gender' must be 0 (unknown), 1, 2 or 3")
            changes["gender"] = gender
        if "birthday" in body:
            birthday = body["birthday"]
            if birthday is not None:
                birthday = field(body, "birthday", str)
                try:
                    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", birthday, re.ASCII):
                        raise ValueError(birthday)
                    day = datetime.date.fromisoformat(birthday)
                except ValueError:
                    raise HTTPError(400, "bad_request",
                                    "field 'birthday' must be YYYY-MM-DD or null") from None
                today = datetime.datetime.fromtimestamp(self.now(), datetime.UTC).date()
                if day > today:
                    raise HTTPError(400, "bad_request", "field 'birthday' is in the future")
            changes["birthday"] = birthday
        if not changes:
            raise HTTPError(400, "bad_request", "nothing to change (nick, gender, birthday)")
        d = self.store.update_profile(uid, changes)
        return d.addCallback(lambda version: respond(request, {"version": version}))
