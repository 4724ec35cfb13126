"""The client's local cache of lists and details: one SQLite file per account,
as a mobile app keeps it (the talk's "本地数据+时间戳", section 四).

What it holds:

- ``versions``: the versions of the lists the cache holds (``friends``,
  ``groups``, ``categories``: the version that came with the list itself) and
  the server's last ``me``, ``friend_rows`` and ``group_rows``; ``meta`` keeps
  the ETag of the last ``GET /v1/versions`` answer and the account's uid;
- the id lists: ``friend_ids`` (uid, category), ``categories`` (id, name),
  ``group_ids``;
- details, each with its row version and a ``stale`` flag ("may be out of
  date: ask the server before trusting it"): ``users`` (id, nick, gender,
  birthday) and ``groups`` (id, name, intro, owner, members_version);
- each group's member list with its version (``members``, ``member_lists``).

Every write is one transaction: a sync that fails half-way leaves the cache
as it was.  The file is readable by its owner only (mode 0600): it holds the
account's contacts.  ``Sync`` (``im58d.client.sync``) decides what to ask; this module
only stores and answers.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE friend_ids (uid INTEGER PRIMARY KEY, category INTEGER NOT NULL);
CREATE TABLE categories (id INTEGER PRIMARY KEY, name TEXT NOT NULL, position INTEGER NOT NULL);
CREATE TABLE group_ids (gid INTEGER PRIMARY KEY);
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    nick TEXT NOT NULL,
    gender INTEGER NOT NULL,
    birthday TEXT,
    version INTEGER NOT NULL,
    stale INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE groups (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    intro TEXT NOT NULL,
    owner INTEGER NOT NULL,
    members_version INTEGER NOT NULL,
    version INTEGER NOT NULL,
    stale INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE member_lists (gid INTEGER PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE members (gid INTEGER NOT NULL, uid INTEGER NOT NULL, PRIMARY KEY (gid, uid))
    WITHOUT ROWID;
"""

_TABLES = ("meta", "versions", "friend_ids", "categories", "group_ids", "users", "groups",
           "member_lists", "members")

# the lists whose version is the one of the list the cache holds
LISTS = ("friends", "groups", "categories")


class User(NamedTuple):
    """A user's details as the cache holds them."""

    id: int
    nick: str
    gender: int
    birthday: str | None
    version: int
    stale: bool = False


class Group(NamedTuple):
    """A group's details as the cache holds them."""

    id: int
    name: str
    intro: str
    owner: int
    members_version: int
    version: int
    stale: bool = False


class Cache:
    """One account's cache in one SQLite file (``":memory:"`` for tests)."""

    def __init__(self, path: str = ":memory:") -> None:
        self.path = path
        if path != ":memory:" and not path.startswith("file:"):
            _private(path)
        # isolation_level=None: transactions are begun and ended explicitly
        self.db = sqlite3.connect(path, isolation_level=None)
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            # a cache can always be rebuilt from the server: start afresh
            with self.transaction():
                for table in _TABLES:
                    self.db.execute(f"DROP TABLE IF EXISTS {table}")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: a failure inside rolls every write back."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- the account ---------------------------------------------------------

    @property
    def uid(self) -> int | None:
        value = self._meta("uid")
        return None if value is None else int(value)

    def bind(self, uid: int) -> None:
        """The cache belongs to ``uid``: a cache of another account is emptied."""
        if self.uid == uid:
            return
        with self.transaction() as db:
            for table in _TABLES:
                db.execute(f"DELETE FROM {table}")
            db.execute("INSERT INTO meta (key, value) VALUES ('uid', ?)", (uid,))

    def _meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # -- reading -------------------------------------------------------------

    @property
    def etag(self) -> str | None:
        """The ETag of the last ``GET /v1/versions`` answer applied."""
        value = self._meta("versions_etag")
        return None if value is None else str(value)

    def versions(self) -> dict[str, int]:
        return {name: int(v) for name, v in self.db.execute("SELECT name, version FROM versions")}

    def friends(self) -> list[tuple[int, int]]:
        """``[(uid, category), ...]`` by uid."""
        return [(int(u), int(c)) for u, c in
                self.db.execute("SELECT uid, category FROM friend_ids ORDER BY uid")]

    def categories(self) -> list[tuple[int, str]]:
        """``[(id, name), ...]`` in the server's order."""
        return [(int(i), str(n)) for i, n in
                self.db.execute("SELECT id, name FROM categories ORDER BY position")]

    def groups(self) -> list[int]:
        return [int(g) for (g,) in self.db.execute("SELECT gid FROM group_ids ORDER BY gid")]

    def user(self, uid: int) -> User | None:
        return self.users([uid]).get(uid)

    def users(self, uids: Iterable[int]) -> dict[int, User]:
        """The cached details of ``uids`` (those the cache has), stale or not."""
        found: dict[int, User] = {}
        for chunk, marks in _chunks(list(uids)):
            for i, nick, gender, birthday, version, stale in self.db.execute(
                "SELECT id, nick, gender, birthday, version, stale FROM users "
                f"WHERE id IN ({marks})", chunk
            ):
                found[i] = User(i, nick, gender, birthday, version, bool(stale))
        return found

    def group(self, gid: int) -> Group | None:
        return self.group_details([gid]).get(gid)

    def group_details(self, gids: Iterable[int]) -> dict[int, Group]:
        found: dict[int, Group] = {}
        for chunk, marks in _chunks(list(gids)):
            for i, name, intro, owner, members_version, version, stale in self.db.execute(
                "SELECT id, name, intro, owner, members_version, version, stale FROM groups "
                f"WHERE id IN ({marks})", chunk
            ):
                found[i] = Group(i, name, intro, owner, members_version, version, bool(stale))
        return found

    def members(self, gid: int) -> list[int] | None:
        """A group's cached member list, None when the cache has none."""
        if self.members_version(gid) is None:
            return None
        return [int(u) for (u,) in
                self.db.execute("SELECT uid FROM members WHERE gid = ? ORDER BY uid", (gid,))]

    def members_version(self, gid: int) -> int | None:
        row = self.db.execute("SELECT version FROM member_lists WHERE gid = ?", (gid,)).fetchone()
        return None if row is None else int(row[0])

    def user_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM users").fetchone()[0])

    def group_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM groups").fetchone()[0])

    # -- what to ask for -----------------------------------------------------

    def users_to_ask(self, uids: Iterable[int]) -> dict[int, int]:
        """Of ``uids``, those missing (0) or stale (their cached version):
        the ``have`` of ``POST /v1/users/sync``."""
        wanted = dict.fromkeys(uids, 0)
        for user in self.users(wanted).values():
            if user.stale:
                wanted[user.id] = user.version
            else:
                del wanted[user.id]
        return wanted

    def groups_to_ask(self, gids: Iterable[int]) -> dict[int, int]:
        """Of ``gids``, those missing (0) or stale: the ``have`` of
        ``POST /v1/groups/sync``."""
        wanted = dict.fromkeys(gids, 0)
        for group in self.group_details(wanted).values():
            if group.stale:
                wanted[group.id] = group.version
            else:
                del wanted[group.id]
        return wanted

    # -- writing -------------------------------------------------------------

    def apply_sync(
        self,
        uid: int,
        versions: dict[str, int] | None,
        etag: str | None,
        lists: dict[str, dict[str, Any]],
    ) -> set[str]:
        """Apply one sync round in one transaction: ``versions`` and ``etag``
        from ``GET /v1/versions`` (None: it answered 304) and the list bodies
        fetched (``lists["friends"]`` is the ``GET /v1/friends`` answer, and so
        on).  Marks details stale where the row versions moved.  Returns what
        moved: the names of the lists replaced and of the row versions that
        made details stale."""
        moved: set[str] = set()
        with self.transaction() as db:
            held = self.versions()
            rows_known = "friend_rows" in held
            if versions is not None:
                for name in ("me", "friend_rows", "group_rows"):
                    if name in versions and versions[name] != held.get(name):
                        moved.add(name)
                rows_known = "friend_rows" in versions and "group_rows" in versions
                for name, version in versions.items():
                    if name not in LISTS:
                        _set_version(db, name, version)
                if etag is not None:
                    db.execute("INSERT OR REPLACE INTO meta (key, value) "
                               "VALUES ('versions_etag', ?)", (etag,))
            friends = lists.get("friends")
            if friends is not None:
                before = {u for (u,) in db.execute("SELECT uid FROM friend_ids")}
                db.execute("DELETE FROM friend_ids")
                db.executemany("INSERT INTO friend_ids (uid, category) VALUES (?, ?)",
                               [(int(f), int(c)) for f, c in friends["friends"]])
                _set_version(db, "friends", friends["version"])
                # a new friend's cached row was kept as a non-friend's: ask again
                new = [int(f) for f, _ in friends["friends"] if int(f) not in before]
                for chunk, marks in _chunks(new):
                    db.execute(f"UPDATE users SET stale = 1 WHERE id IN ({marks})", chunk)
                moved.add("friends")
            categories = lists.get("categories")
            if categories is not None:
                db.execute("DELETE FROM categories")
                db.executemany("INSERT INTO categories (id, name, position) VALUES (?, ?, ?)",
                               [(int(c), str(n), i)
                                for i, (c, n) in enumerate(categories["categories"])])
                _set_version(db, "categories", categories["version"])
                moved.add("categories")
            groups = lists.get("groups")
            if groups is not None:
                before = {g for (g,) in db.execute("SELECT gid FROM group_ids")}
                gids = [int(g) for g in groups["groups"]]
                db.execute("DELETE FROM group_ids")
                db.executemany("INSERT INTO group_ids (gid) VALUES (?)", [(g,) for g in gids])
                _set_version(db, "groups", groups["version"])
                # groups left: their details and members go
                for table, column in (("groups", "id"), ("member_lists", "gid"),
                                      ("members", "gid")):
                    db.execute(f"DELETE FROM {table} WHERE {column} NOT IN "
                               "(SELECT gid FROM group_ids)")
                new = [g for g in gids if g not in before]
                for chunk, marks in _chunks(new):
                    db.execute(f"UPDATE groups SET stale = 1 WHERE id IN ({marks})", chunk)
                moved.add("groups")
            if "friend_rows" in moved or not rows_known:
                db.execute("UPDATE users SET stale = 1 WHERE id IN (SELECT uid FROM friend_ids)")
            if "group_rows" in moved or not rows_known:
                db.execute("UPDATE groups SET stale = 1")
            if "me" in moved or not rows_known:
                db.execute("UPDATE users SET stale = 1 WHERE id = ?", (uid,))
            # Nothing in /v1/versions covers the details of users who are not
            # friends (group members): they are asked again once per sync, when
            # shown.
            db.execute("UPDATE users SET stale = 1 WHERE id != ? "
                       "AND id NOT IN (SELECT uid FROM friend_ids)", (uid,))
        return moved

    def put_users(self, rows: list[dict[str, Any]], asked: Iterable[int]) -> None:
        """The answer of ``POST /v1/users/sync`` for the ids in ``asked``: the
        rows that came are stored; the stale ones asked that did not come are
        up to date."""
        with self.transaction() as db:
            for chunk, marks in _chunks(list(asked)):
                db.execute(f"UPDATE users SET stale = 0 WHERE id IN ({marks})", chunk)
            db.executemany(
                "INSERT INTO users (id, nick, gender, birthday, version, stale) "
                "VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (id) DO UPDATE SET "
                "nick = excluded.nick, gender = excluded.gender, birthday = excluded.birthday, "
                "version = excluded.version, stale = 0 WHERE excluded.version >= users.version",
                [(r["id"], r["nick"], r["gender"], r["birthday"], r["version"]) for r in rows],
            )

    def put_groups(self, rows: list[dict[str, Any]], asked: Iterable[int]) -> None:
        """The answer of ``POST /v1/groups/sync`` for ``asked``: like
        ``put_users``; an asked group that did not come and is not in the
        group list (left meanwhile) is forgotten."""
        with self.transaction() as db:
            for chunk, marks in _chunks(list(asked)):
                db.execute(f"UPDATE groups SET stale = 0 WHERE id IN ({marks})", chunk)
                db.execute(f"DELETE FROM groups WHERE id IN ({marks}) "
                           "AND id NOT IN (SELECT gid FROM group_ids)", chunk)
            db.executemany(
                "INSERT INTO groups (id, name, intro, owner, members_version, version, stale) "
                "VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (id) DO UPDATE SET "
                "name = excluded.name, intro = excluded.intro, owner = excluded.owner, "
                "members_version = excluded.members_version, version = excluded.version, "
                "stale = 0 WHERE excluded.version >= groups.version",
                [(r["id"], r["name"], r["intro"], r["owner"], r["members_version"], r["version"])
                 for r in rows],
            )

    def put_members(self, gid: int, version: int, uids: list[int]) -> None:
        """A group's member list, as ``GET /v1/groups/<gid>/members`` gave it."""
        with self.transaction() as db:
            db.execute("DELETE FROM members WHERE gid = ?", (gid,))
            db.executemany("INSERT INTO members (gid, uid) VALUES (?, ?)",
                           [(gid, int(u)) for u in uids])
            db.execute("INSERT OR REPLACE INTO member_lists (gid, version) VALUES (?, ?)",
                       (gid, version))


def _private(path: str) -> None:
    """Create the file at ``path`` with mode 0600, or take group and others'
    access away from an existing one (SQLite gives its journal files the
    database file's mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _set_version(db: sqlite3.Connection, name: str, version: int) -> None:
    db.execute("INSERT OR REPLACE INTO versions (name, version) VALUES (?, ?)",
               (name, int(version)))


# ids per IN (...) list, under SQLite's limit of host parameters
CHUNK = 500


def _chunks(ids: list[int]) -> Iterator[tuple[list[int], str]]:
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        yield chunk, ",".join("?" * len(chunk))
