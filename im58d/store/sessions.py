"""Devices and their sessions (functions for the database thread).

A session is a device's sign-in (PROTOCOL.md 1.3): it is made by LOGIN or
``POST /v1/login``, and lasts until the device signs out, signs in again,
is evicted by a newer device past ``max_devices``, the account is disabled,
or it goes unused for ``expire_days``.  Every record lives here, so sessions
outlive the daemon; the logic layer keeps copies of the online ones.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from .accounts import bump_list, session_state_txn, user_states_txn

# the columns of a session record, in the order of _KEYS, and what they are
# read from (device_cursors: see schema 4)
_RECORD = (
    "s.id, s.uid, s.device, d.device_id, d.name, s.client, s.key, s.token, s.nonce, "
    "c.acked, s.online, s.last_active"
)
_FROM = "sessions s JOIN devices d ON d.id = s.device JOIN device_cursors c ON c.id = s.device"
_KEYS = (
    "session_id", "uid", "device", "device_id", "name", "client", "key", "token", "nonce",
    "acked", "online", "last_active",
)
ZERO_NONCE = bytes(8)


def _record(row: Any) -> dict[str, Any]:
    record = dict(zip(_KEYS, row, strict=True))
    record["online"] = bool(record["online"])
    return record


def last_cmid_txn(db: sqlite_utils.Database, uid: int, device: int) -> int:
    """The highest cmid stored from this device (0 for none)."""
    row = db.execute(
        "SELECT max(cmid) FROM messages WHERE sender = ? AND device = ?", (uid, device)
    ).fetchone()
    return int(row[0] or 0)


def sign_in_txn(
    db: sqlite_utils.Database,
    uid: int,
    device_id: bytes,
    name: str,
    client: str | None,
    session_id: bytes,
    key: bytes,
    token: str,
    now: int,
    max_devices: int,
    online: bool,
) -> dict[str, Any]:
    """A new session for the device (LOGIN, ``POST /v1/login``).

    The device's previous session ends (``replaced``), and so do the least
    recently active sessions past ``max_devices`` (``evicted``).  Returns
    what WELCOME says and what the session starts with: ``device``,
    ``acked``, ``last_cmid``, ``replaced`` (a session id or None),
    ``evicted`` (session ids), and ``session_state_txn``'s keys.
    """
    execute = db.conn.execute
    row = execute(
        "SELECT id, acked FROM device_cursors WHERE uid = ? AND device_id = ?",
        (uid, device_id),
    ).fetchone()
    if row is None:
        # a new device starts where the user's timeline was at the upgrade
        # to version 2 (0 for users made since)
        base = execute("SELECT base_seq FROM inboxes WHERE uid = ?", (uid,)).fetchone()
        cur = execute(
            "INSERT INTO devices (uid, device_id, name, acked) VALUES (?, ?, ?, ?)",
            (uid, device_id, name, int(base[0]) if base else 0),
        )
        device, acked = int(cur.lastrowid or 0), int(base[0]) if base else 0
    else:
        device, acked = int(row[0]), int(row[1])
        if name:
            execute("UPDATE devices SET name = ? WHERE id = ?", (name, device))
    old = execute("SELECT id FROM sessions WHERE device = ?", (device,)).fetchone()
    replaced = bytes(old[0]) if old is not None else None
    if replaced is not None:
        execute("DELETE FROM sessions WHERE id = ?", (replaced,))
    execute(
        "INSERT INTO sessions (id, device, uid, key, token, client, nonce, created, "
        "last_active, online) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (session_id, device, uid, key, token, client, ZERO_NONCE, now, now, int(online)),
    )
    evicted = [
        bytes(sid)
        for (sid,) in execute(
            # the least recently active go first; a device online now is
            # active now
            "SELECT id FROM sessions WHERE uid = ? AND id != ? "
            "ORDER BY online DESC, last_active DESC, created DESC, device DESC "
            "LIMIT -1 OFFSET ?",
            (uid, session_id, max_devices - 1),
        ).fetchall()
    ]
    for sid in evicted:
        execute("DELETE FROM sessions WHERE id = ?", (sid,))
    bump_list(db, uid, "device_list")
    state = session_state_txn(db, uid)
    state.update(
        device=device,
        acked=acked,
        last_cmid=last_cmid_txn(db, uid, device),
        replaced=replaced,
        evicted=evicted,
    )
    return state


def session_txn(db: sqlite_utils.Database, session_id: bytes) -> dict[str, Any] | None:
    """The record of a session: ``session_id, uid, device, device_id, name,
    client, key, token, nonce, acked, online, last_active``; None when it
    does not exist."""
    row = db.execute(
        f"SELECT {_RECORD} FROM {_FROM} WHERE s.id = ?",
        (session_id,),
    ).fetchone()
    return None if row is None else _record(row)


def session_by_token_txn(db: sqlite_utils.Database, token: str) -> dict[str, Any] | None:
    """The record of the session with this bearer token, unless the account
    is disabled."""
    row = db.execute(
        f"SELECT {_RECORD} FROM {_FROM} JOIN users u ON u.id = s.uid "
        "WHERE s.token = ? AND u.disabled = 0",
        (token,),
    ).fetchone()
    return None if row is None else _record(row)


def resume_txn(
    db: sqlite_utils.Database, session_id: bytes, nonce: bytes, now: int
) -> dict[str, Any] | None:
    """Record a RESUME's nonce, if it is greater than every nonce accepted
    for the session before (8 bytes big-endian compare as numbers), and
    mark the device online: then the session's state (``session_state_txn``
    and ``acked``, ``last_cmid``); None when the session is gone or the
    nonce is not greater."""
    cur = db.execute(
        "UPDATE sessions SET nonce = ?, last_active = ?, online = 1 WHERE id = ? AND nonce < ? "
        "AND uid NOT IN (SELECT id FROM users WHERE disabled = 1)",
        (nonce, now, session_id, nonce),
    )
    if cur.rowcount != 1:
        return None
    uid, device, acked = db.execute(
        f"SELECT s.uid, s.device, c.acked FROM {_FROM} WHERE s.id = ?", (session_id,)
    ).fetchone()
    state = session_state_txn(db, uid)
    state.update(acked=int(acked), last_cmid=last_cmid_txn(db, uid, device))
    return state


def set_offline_txn(db: sqlite_utils.Database, session_ids: list[bytes], now: int) -> None:
    """These devices went offline (BYE, linger expiry)."""
    db.conn.executemany(
        "UPDATE sessions SET online = 0, last_active = ? WHERE id = ?",
        [(now, sid) for sid in session_ids],
    )


def online_sessions_txn(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """The sessions whose devices were online when the daemon stopped (not
    those of accounts disabled meanwhile: they are not to be online), each
    with its user's ``friends`` and list ``versions``: what a restart needs
    to make them linger, in one read."""
    records = [
        _record(row)
        for row in db.execute(
            f"SELECT {_RECORD} FROM {_FROM} JOIN users u ON u.id = s.uid "
            "WHERE s.online = 1 AND u.disabled = 0"
        ).fetchall()
    ]
    states = user_states_txn(db, sorted({record["uid"] for record in records}))
    for record in records:
        record.update(states[record["uid"]])
    return records


def sign_out_txn(
    db: sqlite_utils.Database, uid: int, device_id: bytes | None, session_id: bytes | None
) -> bytes | None:
    """End the session of one of the user's devices (by device id, or by
    session id for ``current``); its id, or None when it has none."""
    if session_id is None:
        row = db.execute(
            "SELECT s.id FROM sessions s JOIN devices d ON d.id = s.device "
            "WHERE d.uid = ? AND d.device_id = ?",
            (uid, device_id),
        ).fetchone()
        if row is None:
            return None
        session_id = bytes(row[0])
    cur = db.execute("DELETE FROM sessions WHERE id = ? AND uid = ?", (session_id, uid))
    if cur.rowcount != 1:
        return None
    bump_list(db, uid, "device_list")
    return session_id


def end_sessions_txn(db: sqlite_utils.Database, session_ids: list[bytes]) -> list[int]:
    """End these sessions (accounts disabled, expired); the uids whose
    device lists moved."""
    uids: set[int] = set()
    for sid in session_ids:
        row = db.execute("DELETE FROM sessions WHERE id = ? RETURNING uid", (sid,)).fetchone()
        if row is not None:
            uids.add(int(row[0]))
    for uid in uids:
        bump_list(db, uid, "device_list")
    return sorted(uids)


def stale_sessions_txn(
    db: sqlite_utils.Database, unused_since: int
) -> list[tuple[int, bytes]]:
    """``(uid, session_id)`` of the sessions to end: those of disabled
    accounts, and those of offline devices unused since ``unused_since``."""
    return [
        (int(uid), bytes(sid))
        for uid, sid in db.execute(
            "SELECT s.uid, s.id FROM sessions s JOIN users u ON u.id = s.uid "
            "WHERE u.disabled = 1 OR (s.online = 0 AND s.last_active < ?)",
            (unused_since,),
        ).fetchall()
    ]


def devices_txn(db: sqlite_utils.Database, uid: int) -> tuple[int, list[dict[str, Any]]]:
    """The device list's version and the user's signed-in devices, the
    online ones first, then the most recently active: ``{"device_id",
    "name", "session_id", "online", "last_seen"}`` (``last_seen``: the last
    sign-in, RESUME or going offline)."""
    (version,) = db.execute(
        "SELECT device_list FROM list_versions WHERE uid = ?", (uid,)
    ).fetchone() or (0,)
    devices = [
        {"device_id": bytes(device_id), "name": name, "session_id": bytes(sid),
         "online": bool(online), "last_seen": int(last_active)}
        for device_id, name, sid, online, last_active in db.execute(
            "SELECT d.device_id, d.name, s.id, s.online, s.last_active FROM sessions s "
            "JOIN devices d ON d.id = s.device WHERE s.uid = ? "
            "ORDER BY s.online DESC, s.last_active DESC, s.created DESC, s.device DESC",
            (uid,),
        ).fetchall()
    ]
    return int(version), devices

