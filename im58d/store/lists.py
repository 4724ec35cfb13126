"""Friends, categories, groups and profiles as the HTTP API reads and changes
them (functions for the database thread; PROTOCOL.md section 2).

Each list has a version per user (``list_versions``); each user and group row
has a row version drawn from one growing counter (schema 2).  A change bumps
what it changes in the same transaction.  Functions that change lists return
the uids whose lists moved, so that their connected sessions get CHANGED.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import sqlite_utils

from .accounts import (
    _require_users,
    bump_list,
    create_group_txn,
    make_friends_txn,
    next_row_version,
)
from .interfaces import Conflict, Forbidden, Invalid, NotFound

# ids per IN (...) list: under SQLite's default limit of host parameters
CHUNK = 500


def _chunks(ids: list[int]) -> Any:
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        yield chunk, ",".join("?" * len(chunk))


# -- reading ----------------------------------------------------------------


def versions_txn(db: sqlite_utils.Database, uid: int) -> dict[str, int]:
    """Every version a client compares in one answer; ``friend_rows`` and
    ``group_rows`` are the highest row versions among the user's friends and
    groups: they move when a friend's or group's details change."""
    row = db.execute(
        "SELECT l.friend_list, l.group_list, l.category_list, l.request_list, l.device_list, "
        "u.version, "
        "(SELECT coalesce(max(f.version), 0) FROM friends x JOIN users f ON f.id = x.friend "
        " WHERE x.uid = l.uid), "
        "(SELECT coalesce(max(g.version), 0) FROM group_members m JOIN groups g ON g.id = m.gid "
        " WHERE m.uid = l.uid) "
        "FROM list_versions l JOIN users u ON u.id = l.uid WHERE l.uid = ?",
        (uid,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no such user {uid}")
    keys = ("friends", "groups", "categories", "requests", "devices", "me", "friend_rows",
            "group_rows")
    return dict(zip(keys, map(int, row), strict=True))


def _list_version(db: sqlite_utils.Database, uid: int, column: str) -> int:
    row = db.execute(f"SELECT {column} FROM list_versions WHERE uid = ?", (uid,)).fetchone()
    return 0 if row is None else int(row[0])


def friends_txn(db: sqlite_utils.Database, uid: int) -> tuple[int, list[list[int]]]:
    """The friend list version and ``[[uid, category], ...]`` by uid."""
    friends = [
        [int(friend), int(category)]
        for friend, category in db.execute(
            "SELECT friend, category FROM friends WHERE uid = ? ORDER BY friend", (uid,)
        )
    ]
    return _list_version(db, uid, "friend_list"), friends


def categories_txn(db: sqlite_utils.Database, uid: int) -> tuple[int, list[list[Any]]]:
    categories = [
        [int(cid), name]
        for cid, name in db.execute(
            "SELECT id, name FROM categories WHERE uid = ? ORDER BY id", (uid,)
        )
    ]
    return _list_version(db, uid, "category_list"), categories


def groups_txn(db: sqlite_utils.Database, uid: int) -> tuple[int, list[int]]:
    gids = [
        int(gid)
        for (gid,) in db.execute("SELECT gid FROM group_members WHERE uid = ? ORDER BY gid", (uid,))
    ]
    return _list_version(db, uid, "group_list"), gids


def users_sync_txn(
    db: sqlite_utils.Database, uid: int, have: dict[int, int]
) -> list[dict[str, Any]]:
    """Details of the users in ``have`` whose row is newer than the version
    the client has, among those the caller may see: themselves, friends,
    members of a group they are in, and users who sent them a request."""
    rows: list[dict[str, Any]] = []
    for chunk, marks in _chunks(sorted(have)):
        for row in db.execute(
            "SELECT u.id, u.nick, u.gender, u.birthday, u.version FROM users u "
            f"WHERE u.id IN ({marks}) AND (u.id = ? "
            " OR EXISTS (SELECT 1 FROM friends WHERE uid = ? AND friend = u.id)"
            " OR EXISTS (SELECT 1 FROM group_members a JOIN group_members b ON b.gid = a.gid"
            "            WHERE a.uid = ? AND b.uid = u.id)"
            " OR EXISTS (SELECT 1 FROM friend_requests WHERE sender = u.id AND receiver = ?))",
            [*chunk, uid, uid, uid, uid],
        ):
            if row[4] > have[row[0]]:
                rows.append(
                    {"id": row[0], "nick": row[1], "gender": row[2], "birthday": row[3],
                     "version": row[4]}
                )
    return rows


def groups_sync_txn(
    db: sqlite_utils.Database, uid: int, have: dict[int, int]
) -> list[dict[str, Any]]:
    """Details of the caller's groups in ``have`` newer than the client's."""
    rows: list[dict[str, Any]] = []
    for chunk, marks in _chunks(sorted(have)):
        for row in db.execute(
            "SELECT g.id, g.name, g.intro, g.owner, g.members_version, g.version "
            f"FROM groups g JOIN group_members m ON m.gid = g.id AND m.uid = ? "
            f"WHERE g.id IN ({marks})",
            [uid, *chunk],
        ):
            if row[5] > have[row[0]]:
                rows.append(
                    {"id": row[0], "name": row[1], "intro": row[2], "owner": row[3],
                     "members_version": row[4], "version": row[5]}
                )
    return rows


def _group(db: sqlite_utils.Database, gid: int) -> tuple[int, int]:
    """``(owner, members_version)``; NotFound."""
    row = db.execute(
        "SELECT owner, members_version FROM groups g WHERE id = ? "
        "AND EXISTS (SELECT 1 FROM group_members WHERE gid = g.id)",  # not ended
        (gid,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no such group {gid}")
    return int(row[0]), int(row[1])


def _is_member(db: sqlite_utils.Database, gid: int, uid: int) -> bool:
    return (
        db.execute("SELECT 1 FROM group_members WHERE gid = ? AND uid = ?", (gid, uid)).fetchone()
        is not None
    )


def _require_member(db: sqlite_utils.Database, gid: int, uid: int) -> tuple[int, int]:
    owner, members_version = _group(db, gid)
    if not _is_member(db, gid, uid):
        raise Forbidden(f"you are not a member of group {gid}")
    return owner, members_version


def members_txn(db: sqlite_utils.Database, uid: int, gid: int) -> tuple[int, list[int]]:
    """A group's member list version and members, for a member only."""
    _, members_version = _require_member(db, gid, uid)
    members = [
        int(member)
        for (member,) in db.execute(
            "SELECT uid FROM group_members WHERE gid = ? ORDER BY uid", (gid,)
        )
    ]
    return members_version, members


def friend_requests_txn(
    db: sqlite_utils.Database, uid: int
) -> tuple[int, list[dict[str, int]]]:
    """The request list's version and the pending requests to the user."""
    requests = [
        {"uid": int(sender), "ts": int(ts)}
        for sender, ts in db.execute(
            "SELECT sender, ts FROM friend_requests WHERE receiver = ? ORDER BY ts, sender",
            (uid,),
        )
    ]
    return _list_version(db, uid, "request_list"), requests


# -- changing ---------------------------------------------------------------


def update_profile_txn(db: sqlite_utils.Database, uid: int, changes: dict[str, Any]) -> int:
    """Set some of nick, gender, birthday; the row's new version."""
    assert changes and set(changes) <= {"nick", "gender", "birthday"}
    names = ", ".join(changes)
    row = db.execute(f"SELECT {names}, version FROM users WHERE id = ?", (uid,)).fetchone()
    if list(row[:-1]) == list(changes.values()):
        return int(row[-1])  # nothing new: the version stays
    version = next_row_version(db)
    columns = ", ".join(f"{name} = ?" for name in changes)
    db.execute(
        f"UPDATE users SET {columns}, version = ? WHERE id = ?", [*changes.values(), version, uid]
    )
    return version


def _require_category(db: sqlite_utils.Database, uid: int, category: int) -> None:
    if category and db.execute(
        "SELECT 1 FROM categories WHERE id = ? AND uid = ?", (category, uid)
    ).fetchone() is None:
        raise NotFound(f"no such category {category}")


def request_friend_txn(
    db: sqlite_utils.Database, uid: int, other: int, category: int, now: int
) -> tuple[bool, list[int]]:
    """A friend request from ``uid`` to ``other`` (filed in ``category`` on
    the caller's side), or the acceptance of one ``other`` sent: ``(friends
    now, uids whose lists moved)``.  Asking again replaces the request."""
    if uid == other:
        raise Invalid("you cannot befriend yourself")
    _require_users(db, [other])
    _require_category(db, uid, category)
    if db.execute(
        "SELECT 1 FROM friends WHERE uid = ? AND friend = ?", (uid, other)
    ).fetchone() is not None:
        raise Conflict(f"user {other} is your friend already")
    pending = db.execute(
        "SELECT category FROM friend_requests WHERE sender = ? AND receiver = ?", (other, uid)
    ).fetchone()
    if pending is None:
        db.execute(
            "INSERT OR REPLACE INTO friend_requests (sender, receiver, category, ts) "
            "VALUES (?, ?, ?, ?)",
            (uid, other, category, now),
        )
        bump_list(db, other, "request_list")
        return False, [other]
    make_friends_txn(db, uid, other, now)
    db.execute(
        "UPDATE friends SET category = ? WHERE uid = ? AND friend = ?", (category, uid, other)
    )
    db.execute(
        "UPDATE friends SET category = ? WHERE uid = ? AND friend = ?", (pending[0], other, uid)
    )
    return True, [uid, other]


def remove_friend_txn(db: sqlite_utils.Database, uid: int, other: int) -> list[int]:
    """End a friendship both ways, or else decline (or withdraw) a pending
    request between the two; the uids whose lists moved."""
    cur = db.execute(
        "DELETE FROM friends WHERE (uid = ? AND friend = ?) OR (uid = ? AND friend = ?)",
        (uid, other, other, uid),
    )
    if cur.rowcount == 0:
        receivers = [
            int(receiver)
            for (receiver,) in db.execute(
                "DELETE FROM friend_requests WHERE (sender = ? AND receiver = ?) "
                "OR (sender = ? AND receiver = ?) RETURNING receiver",
                (uid, other, other, uid),
            ).fetchall()
        ]
        if not receivers:
            raise NotFound(f"user {other} is neither your friend nor asking to be")
        for receiver in receivers:
            bump_list(db, receiver, "request_list")
        return receivers
    bump_list(db, uid, "friend_list")
    bump_list(db, other, "friend_list")
    return [uid, other]


MAX_CATEGORIES = 100


def add_category_txn(db: sqlite_utils.Database, uid: int, name: str) -> tuple[int, int]:
    """A new friend category: ``(id, category list version)``."""
    (count,) = db.execute("SELECT count(*) FROM categories WHERE uid = ?", (uid,)).fetchone()
    if count >= MAX_CATEGORIES:
        raise Conflict(f"at most {MAX_CATEGORIES} categories")
    try:
        cur = db.execute("INSERT INTO categories (uid, name) VALUES (?, ?)", (uid, name))
    except sqlite3.IntegrityError:
        raise Conflict(f"you have a category {name!r} already") from None
    return int(cur.lastrowid or 0), bump_list(db, uid, "category_list")


def set_category_txn(db: sqlite_utils.Database, uid: int, friend: int, category: int) -> int:
    """File a friend under a category (0: none); the friend list's version."""
    _require_category(db, uid, category)
    cur = db.execute(
        "UPDATE friends SET category = ? WHERE uid = ? AND friend = ?", (category, uid, friend)
    )
    if cur.rowcount == 0:
        raise NotFound(f"user {friend} is not your friend")
    return bump_list(db, uid, "friend_list")


def _size(db: sqlite_utils.Database, gid: int) -> int:
    return int(db.execute("SELECT count(*) FROM group_members WHERE gid = ?", (gid,)).fetchone()[0])


def add_member_txn(
    db: sqlite_utils.Database, uid: int, gid: int, new: int, limit: int, now: int
) -> tuple[list[int], int, int]:
    """A member adds ``new`` to the group: ``(uids whose lists moved,
    members_version, version)``."""
    _require_member(db, gid, uid)
    _require_users(db, [new])
    if _is_member(db, gid, new):
        raise Conflict(f"user {new} is a member already")
    if _size(db, gid) >= limit:
        raise Conflict(f"group {gid} is full ({limit} members)")
    db.execute("INSERT INTO group_members (gid, uid, joined) VALUES (?, ?, ?)", (gid, new, now))
    bump_list(db, new, "group_list")
    return [new], *_members_changed(db, gid)


def remove_member_txn(
    db: sqlite_utils.Database, uid: int, gid: int, target: int
) -> tuple[list[int], int, int]:
    """``uid`` leaves (target = uid) or the owner removes ``target``:
    ``(uids whose lists moved, members_version, version)``.  An owner who
    leaves hands the group to the longest-standing member; the last one to
    leave ends the group (its row stays, memberless, so that its gid and
    versions are never given to another group)."""
    owner, _ = _require_member(db, gid, uid)
    if target != uid and uid != owner:
        raise Forbidden(f"only the owner of group {gid} removes members")
    if not _is_member(db, gid, target):
        raise NotFound(f"user {target} is not a member of group {gid}")
    db.execute("DELETE FROM group_members WHERE gid = ? AND uid = ?", (gid, target))
    bump_list(db, target, "group_list")
    if target == owner:
        heir = db.execute(
            "SELECT uid FROM group_members WHERE gid = ? ORDER BY joined, uid LIMIT 1", (gid,)
        ).fetchone()
        if heir is not None:
            db.execute("UPDATE groups SET owner = ? WHERE id = ?", (heir[0], gid))
    return [target], *_members_changed(db, gid)


def _members_changed(db: sqlite_utils.Database, gid: int) -> tuple[int, int]:
    """The member list and with it the group's row (members_version is one
    of its details) have new versions: ``(members_version, version)``."""
    # from the row counter too: a member list's ETag never matches another
    # group's
    version = next_row_version(db)
    db.execute(
        "UPDATE groups SET members_version = ?, version = ? WHERE id = ?", (version, version, gid)
    )
    return version, version


def new_group_txn(
    db: sqlite_utils.Database, uid: int, name: str, intro: str, members: list[int], limit: int,
    now: int,
) -> tuple[int, int, list[int]]:
    """A group made by ``uid``: ``(gid, version, uids whose lists moved)``."""
    gid = create_group_txn(db, name, uid, members, now, intro, limit)
    (version,) = db.execute("SELECT version FROM groups WHERE id = ?", (gid,)).fetchone()
    return gid, int(version), [uid, *(m for m in dict.fromkeys(members) if m != uid)]
