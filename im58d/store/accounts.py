"""Accounts and their lists: users, friends, groups (functions for the database thread)."""

from __future__ import annotations

import sqlite3
from typing import Any

import sqlite_utils

from .interfaces import LISTS, Conflict, NotFound, StoreError

# -- accounts ---------------------------------------------------------------


def next_row_version(db: sqlite_utils.Database) -> int:
    """The next user or group row version: one counter for all rows."""
    return int(
        db.execute(
            "UPDATE counters SET value = value + 1 WHERE name = 'row_version' RETURNING value"
        ).fetchone()[0]
    )


def add_user_txn(db: sqlite_utils.Database, name: str, password_hash: str, now: int) -> int:
    try:
        cur = db.execute(
            "INSERT INTO users (name, password, nick, created, version) VALUES (?, ?, ?, ?, ?)",
            (name, password_hash, name, now, next_row_version(db)),
        )
    except sqlite3.IntegrityError:
        raise Conflict(f"user {name!r} exists") from None
    uid = int(cur.lastrowid or 0)
    db.execute("INSERT INTO inboxes (uid) VALUES (?)", (uid,))
    db.execute("INSERT INTO list_versions (uid) VALUES (?)", (uid,))
    return uid


def uid_for_name_txn(db: sqlite_utils.Database, name: str) -> int | None:
    row = db.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def _require_uid(db: sqlite_utils.Database, name: str) -> int:
    uid = uid_for_name_txn(db, name)
    if uid is None:
        raise NotFound(f"no such user {name!r}")
    return uid


def set_password_txn(db: sqlite_utils.Database, name: str, password_hash: str) -> int:
    uid = _require_uid(db, name)
    db.execute("UPDATE users SET password = ? WHERE id = ?", (password_hash, uid))
    return uid


def set_disabled_txn(db: sqlite_utils.Database, name: str, disabled: bool) -> int:
    uid = _require_uid(db, name)
    db.execute("UPDATE users SET disabled = ? WHERE id = ?", (int(disabled), uid))
    return uid


def list_users_txn(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    return [
        {"id": row["id"], "name": row["name"], "disabled": bool(row["disabled"])}
        for row in db.query("SELECT id, name, disabled FROM users ORDER BY id")
    ]


def login_record_txn(db: sqlite_utils.Database, name: str) -> tuple[int, str, bool] | None:
    row = db.execute(
        "SELECT id, password, disabled FROM users WHERE name = ?", (name,)
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]), bool(row[2]))


def disabled_users_txn(db: sqlite_utils.Database) -> list[int]:
    return [int(row[0]) for row in db.execute("SELECT id FROM users WHERE disabled = 1")]


def _require_users(db: sqlite_utils.Database, uids: list[int]) -> None:
    for uid in uids:
        if db.execute("SELECT 1 FROM users WHERE id = ?", (uid,)).fetchone() is None:
            raise NotFound(f"no such user {uid}")


def bump_list(db: sqlite_utils.Database, uid: int, column: str) -> int:
    return int(
        db.execute(
            f"UPDATE list_versions SET {column} = {column} + 1 WHERE uid = ? "
            f"RETURNING {column}",
            (uid,),
        ).fetchone()[0]
    )


# -- lists ------------------------------------------------------------------


def make_friends_txn(db: sqlite_utils.Database, uid1: int, uid2: int, now: int) -> None:
    if uid1 == uid2:
        raise StoreError("a user cannot befriend themselves")
    _require_users(db, [uid1, uid2])
    try:
        db.conn.executemany(
            "INSERT INTO friends (uid, friend, since) VALUES (?, ?, ?)",
            [(uid1, uid2, now), (uid2, uid1, now)],
        )
    except sqlite3.IntegrityError:
        raise Conflict(f"users {uid1} and {uid2} are friends already") from None
    answered = db.execute(
        "DELETE FROM friend_requests WHERE (sender = ? AND receiver = ?) "
        "OR (sender = ? AND receiver = ?) RETURNING receiver",
        (uid1, uid2, uid2, uid1),
    ).fetchall()
    for (receiver,) in answered:
        bump_list(db, receiver, "request_list")
    bump_list(db, uid1, "friend_list")
    bump_list(db, uid2, "friend_list")


def create_group_txn(
    db: sqlite_utils.Database,
    name: str,
    owner: int,
    members: list[int],
    now: int,
    intro: str = "",
    limit: int | None = None,
) -> int:
    """A group owned by ``owner`` with ``members`` (the owner is one);
    Conflict past ``limit`` members."""
    everyone = [owner] + [uid for uid in dict.fromkeys(members) if uid != owner]
    if limit is not None and len(everyone) > limit:
        raise Conflict(f"a group has at most {limit} members")
    _require_users(db, everyone)
    version = next_row_version(db)
    cur = db.execute(
        "INSERT INTO groups (name, intro, owner, created, version, members_version) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (name, intro, owner, now, version, version),
    )
    gid = int(cur.lastrowid or 0)
    db.conn.executemany(
        "INSERT INTO group_members (gid, uid, joined) VALUES (?, ?, ?)",
        [(gid, uid, now) for uid in everyone],
    )
    for uid in everyone:
        bump_list(db, uid, "group_list")
    return gid


# -- sessions ---------------------------------------------------------------

# in the order of LISTS
_LIST_COLUMNS = "friend_list, group_list, category_list, request_list, device_list"


def session_state_txn(db: sqlite_utils.Database, uid: int) -> dict[str, Any]:
    """What a session needs to start: the timeline head, the friends to tell
    of presence, and the list versions to notice changes against."""
    head = db.execute("SELECT max_seq FROM inboxes WHERE uid = ?", (uid,)).fetchone()
    versions = db.execute(
        f"SELECT {_LIST_COLUMNS} FROM list_versions WHERE uid = ?", (uid,)
    ).fetchone()
    return {
        "inbox_max": 0 if head is None else int(head[0]),
        "friends": friends_of_txn(db, uid),
        "versions": tuple(versions) if versions is not None else (0,) * len(LISTS),
    }


def user_states_txn(db: sqlite_utils.Database, uids: list[int]) -> dict[int, dict[str, Any]]:
    """``session_state_txn`` of several users at once (adoption, restarts)."""
    states: dict[int, dict[str, Any]] = {
        uid: {"friends": [], "versions": (0,) * len(LISTS)} for uid in uids
    }
    for uid, versions in list_versions_txn(db, uids).items():
        states[uid]["versions"] = versions
    for start in range(0, len(uids), 500):
        chunk = uids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for uid, friend in db.execute(
            f"SELECT uid, friend FROM friends WHERE uid IN ({marks})", chunk
        ):
            states[uid]["friends"].append(int(friend))
    return states


def friends_of_txn(db: sqlite_utils.Database, uid: int) -> list[int]:
    return [int(row[0]) for row in db.execute("SELECT friend FROM friends WHERE uid = ?", (uid,))]


def list_versions_txn(db: sqlite_utils.Database, uids: list[int]) -> dict[int, tuple[int, ...]]:
    """The versions of each user's lists, in the order of LISTS."""
    versions: dict[int, tuple[int, ...]] = {}
    for start in range(0, len(uids), 500):
        chunk = uids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for uid, *row in db.execute(
            f"SELECT uid, {_LIST_COLUMNS} FROM list_versions WHERE uid IN ({marks})",
            chunk,
        ):
            versions[uid] = tuple(row)
    return versions
