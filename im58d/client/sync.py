"""Keeping the cache in step with the server with as few bytes as possible
(the talk's section 四, 流量优化):

- ids apart from details: the lists (friends with their categories, groups)
  are ids only; details are pulled apart from them;
- lazily: details are pulled only for what the app shows (``show``,
  ``show_groups``, ``members``), never for the whole list;
- versions: ``run`` asks ``GET /v1/versions`` with the ETag of the last
  answer; with nothing changed that is the only request, and the answer is a
  304 with no body.  A list is fetched only when its version moved (with
  ``If-None-Match`` all the same); categories are small and never lazy:
  fetched when their version moved or the friend list names one the cache
  does not know.  When ``friend_rows`` (``group_rows``, ``me``) moved, the
  cached details are marked stale, nothing more; the next ``show`` of a
  stale or missing row uploads the version the cache has, and only rows
  that changed come back.

Every round is applied in one cache transaction after all its requests
succeeded, so a failed request leaves the cache as it was and the next
round asks again.  ``Client(sync=Sync(Cache(path)))`` runs a round after
each WELCOME and RESUMED and on CHANGED.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.python.failure import Failure

from .cache import LISTS, Cache, Group, User

# ids per POST .../sync: the server's limit on entries of "have"
MAX_HAVE = 2000
# lists with a CHANGED notice that the cache does not hold
NOT_CACHED = frozenset(("requests", "devices"))


class SyncError(Exception):
    """A sync request failed (not logged in, or an HTTP error); the cache is
    as it was."""


class Sync:
    """Keeps one account's ``Cache`` in step with the server.

    ``session`` is anything with ``http`` (treq-like: ``get``, ``post``),
    ``http_url``, ``token`` and ``uid``: the ``Client`` it is given to
    attaches itself.  ``on_synced(moved)`` is called after every round that
    succeeded, with what moved (see ``Cache.apply_sync``): the app redraws
    what it shows of those.
    """

    def __init__(
        self,
        cache: Cache,
        session: Any = None,
        on_synced: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.cache = cache
        self.session = session
        self.on_synced = on_synced or (lambda moved: None)
        self.rounds = 0  # rounds that succeeded
        self._busy = False
        self._waiting: list[Deferred[set[str]]] = []

    def attach(self, session: Any) -> None:
        self.session = session

    # -- the versions round ----------------------------------------------------

    def run(self) -> Deferred[set[str]]:
        """One sync round, started now or, while one is running, right after
        it; fires with what moved, or fails with the request's error."""
        d: Deferred[set[str]] = Deferred()
        self._waiting.append(d)
        if not self._busy:
            self._next()
        return d

    def changed(self, what: str, version: int) -> Deferred[set[str]]:
        """CHANGED ``[what, version]``: a round, unless the cache holds that
        version of the list already, or holds nothing of that list (pending
        friend requests and devices are the app's to fetch when it shows
        them: ``GET /v1/friends/requests``, ``GET /v1/devices``)."""
        if what in NOT_CACHED:
            return succeed(set())
        held = self.cache.versions().get(what) if what in LISTS else None
        if held is not None and held >= version and not self._busy:
            return succeed(set())
        return self.run()

    def _next(self) -> None:
        waiting, self._waiting = self._waiting, []
        self._busy = True

        def done(result: set[str] | Failure) -> None:
            self._busy = False
            if not isinstance(result, Failure):
                self.rounds += 1
                self.on_synced(result)
            for d in waiting:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)
            if self._waiting:
                self._next()

        self._round().addBoth(done)

    @inlineCallbacks
    def _round(self) -> Any:
        cache = self.cache
        uid = self._session().uid
        cache.bind(uid)
        answer = yield self._request("GET", "/v1/versions", etag=cache.etag)
        if answer is None:  # 304: nothing moved
            return cache.apply_sync(uid, None, None, {})
        versions, etag = answer
        held = cache.versions()
        lists: dict[str, dict[str, Any]] = {}
        for name, path in (("friends", "/v1/friends"), ("groups", "/v1/groups")):
            if name in versions and versions[name] != held.get(name):
                got = yield self._list(path, held.get(name))
                if got is not None:
                    lists[name] = got
        known = {c for c, _ in cache.categories()}
        unknown = "friends" in lists and any(
            c and c not in known for _, c in lists["friends"]["friends"]
        )
        if versions.get("categories") != held.get("categories") or unknown:
            got = yield self._list("/v1/categories", held.get("categories"))
            if got is not None:
                lists["categories"] = got
        return cache.apply_sync(uid, versions, etag, lists)

    @inlineCallbacks
    def _list(self, path: str, held: int | None) -> Any:
        """A list's body, or None when the cache's version is current (304)."""
        answer = yield self._request("GET", path, etag=None if held is None else f'"{held}"')
        return None if answer is None else answer[0]

    # -- details, lazily ---------------------------------------------------------

    @inlineCallbacks
    def show(self, uids: Iterable[int]) -> Any:
        """The details of users the app is about to show: those missing from
        the cache or stale are asked with ``POST /v1/users/sync`` (uploading
        the versions the cache has, so only changed rows come back); the
        rest come from the cache.  Fires with ``{uid: User}`` (users the
        server does not show this account are left out); fails when a
        request fails, and the cache is as it was (offline, an app reads
        ``cache.users`` and shows what it has)."""
        uids = list(dict.fromkeys(uids))
        wanted = self.cache.users_to_ask(uids)
        rows = yield self._sync_rows("/v1/users/sync", "users", wanted)
        if wanted:
            self.cache.put_users(rows, wanted)
        found: dict[int, User] = self.cache.users(uids)
        return found

    @inlineCallbacks
    def show_groups(self, gids: Iterable[int]) -> Any:
        """Like ``show`` for groups (``POST /v1/groups/sync``): ``{gid: Group}``."""
        gids = list(dict.fromkeys(gids))
        wanted = self.cache.groups_to_ask(gids)
        rows = yield self._sync_rows("/v1/groups/sync", "groups", wanted)
        if wanted:
            self.cache.put_groups(rows, wanted)
        found: dict[int, Group] = self.cache.group_details(gids)
        return found

    @inlineCallbacks
    def members(self, gid: int) -> Any:
        """A group's member uids, for showing them: the group's details are
        made current (``show_groups``), then the member list is fetched with
        ``If-None-Match`` only when its ``members_version`` moved.  None for a
        group the account is not in."""
        group = (yield self.show_groups([gid])).get(gid)
        if group is None:
            return None
        held = self.cache.members_version(gid)
        if held != group.members_version:
            answer = yield self._request(
                "GET", f"/v1/groups/{gid}/members", etag=None if held is None else f'"{held}"'
            )
            if answer is not None:
                body = answer[0]
                self.cache.put_members(gid, body["version"], body["members"])
        return self.cache.members(gid)

    @inlineCallbacks
    def _sync_rows(self, path: str, key: str, wanted: dict[int, int]) -> Any:
        rows: list[dict[str, Any]] = []
        ids = list(wanted)
        for start in range(0, len(ids), MAX_HAVE):
            have = {str(i): wanted[i] for i in ids[start : start + MAX_HAVE]}
            answer = yield self._request("POST", path, body={"have": have})
            assert answer is not None
            rows += answer[0][key]
        return rows

    # -- HTTP ------------------------------------------------------------------

    def _session(self) -> Any:
        session = self.session
        if session is None or session.token is None or session.uid is None:
            raise SyncError("not logged in")
        return session

    @inlineCallbacks
    def _request(
        self, method: str, path: str, body: Any = None, etag: str | None = None
    ) -> Any:
        """``(JSON body, ETag)``, or None for a 304; SyncError otherwise."""
        session = self._session()
        headers = {"Authorization": f"Bearer {session.token}"}
        if etag is not None:
            headers["If-None-Match"] = etag
        url = session.http_url + path
        if method == "GET":
            response = yield session.http.get(url, headers=headers)
        else:
            response = yield session.http.post(url, json=body, headers=headers)
        content = yield response.content()
        if response.code == 304:
            return None
        if response.code != 200:
            raise SyncError(f"{method} {path}: HTTP {response.code} {content[:200]!r}")
        tags = response.headers.getRawHeaders(b"etag") or [None]
        tag = tags[0].decode("latin-1") if isinstance(tags[0], bytes) else tags[0]
        return json.loads(content), tag
