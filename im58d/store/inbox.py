"""Messages, inboxes and acks (functions for the database thread).

``deliver_txn`` is the message path's one transaction per batch: it stores
the batch's messages (de-duplicated by sender and cmid), appends them to the
receivers' inboxes with the next seqs, and records the batch's acks.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

KIND_USER = 0
KIND_GROUP = 1

# outcome of one message of a batch:
#   (STORED, msg_id, ts, ((uid, seq), ...))  the receivers' inbox entries
#   (DUPLICATE, msg_id, ts, ())              stored before under this cmid
#   (REFUSED, code, message)                 ERROR code for the sender
STORED = 0
DUPLICATE = 1
REFUSED = 2

# A message to deliver: (sender, cmid, to, body, kind); an ack: (uid, seq).
Submitted = tuple[int, int, int, "str | bytes", int]
# (uid, the ack cursor now, ((sender, cmid, msg_id), ...) newly acked 1:1 messages)
AckResult = tuple[int, int, tuple[tuple[int, int, int], ...]]


def inbox_max_txn(db: sqlite_utils.Database, uid: int) -> int:
    row = db.execute("SELECT max_seq FROM inboxes WHERE uid = ?", (uid,)).fetchone()
    return 0 if row is None else int(row[0])


class _Heads:
    """The inbox heads touched by one transaction, read once, written once."""

    def __init__(self, execute: Any) -> None:
        self._execute = execute
        self.seqs: dict[int, int] = {}
        self.loaded: dict[int, int] = {}

    def get(self, uid: int) -> int | None:
        seq = self.seqs.get(uid)
        if seq is None:
            row = self._execute("SELECT max_seq FROM inboxes WHERE uid = ?", (uid,)).fetchone()
            if row is None:
                return None
            seq = self.seqs[uid] = self.loaded[uid] = row[0]
        return seq

    def write(self) -> None:
        for uid, seq in self.seqs.items():
            if seq != self.loaded[uid]:
                self._execute("UPDATE inboxes SET max_seq = ? WHERE uid = ?", (seq, uid))


_INSERT = (
    "INSERT INTO messages (sender, cmid, kind, target, seq, body, ts) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sender, cmid) DO NOTHING"
)
_EARLIER = "SELECT id, ts FROM messages WHERE sender = ? AND cmid = ?"


def deliver_txn(
    db: sqlite_utils.Database,
    messages: list[Submitted],
    acks: list[tuple[int, int]],
    now: int,
    friends_only: bool = False,
) -> tuple[list[tuple[Any, ...]], list[AckResult]]:
    """Store and route a batch of messages and record a batch of acks."""
    execute = db.conn.execute
    heads = _Heads(execute)
    rows: list[tuple[int, int, int]] = []  # inbox (uid, seq, msg_id)
    results: list[tuple[Any, ...]] = []
    members_of: dict[int, list[int] | None] = {}  # gid -> members, None: no group
    for sender, cmid, to, body, kind in messages:
        if friends_only or kind != KIND_USER:
            # Checks that may refuse come after the de-dup, so a retransmit
            # of a stored message always gets its MSG_A back.
            earlier = execute(_EARLIER, (sender, cmid)).fetchone()
            if earlier is not None:
                results.append((DUPLICATE, earlier[0], earlier[1], ()))
                continue
        if kind == KIND_USER:
            head = heads.get(to)
            if head is None:
                results.append((REFUSED, 404, f"no such user {to}"))
                continue
            if friends_only and to != sender and execute(
                "SELECT 1 FROM friends WHERE uid = ? AND friend = ?", (sender, to)
            ).fetchone() is None:
                results.append((REFUSED, 403, f"user {to} is not your friend"))
                continue
            seq = head + 1
            cur = execute(_INSERT, (sender, cmid, KIND_USER, to, seq, body, now))
            if cur.rowcount == 0:
                earlier = execute(_EARLIER, (sender, cmid)).fetchone()
                results.append((DUPLICATE, earlier[0], earlier[1], ()))
                continue
            heads.seqs[to] = seq
            msg_id = int(cur.lastrowid or 0)
            rows.append((to, seq, msg_id))
            results.append((STORED, msg_id, now, ((to, seq),)))
        else:
            if to not in members_of:
                members_of[to] = _members(execute, to)
            members = members_of[to]
            if members is None:
                results.append((REFUSED, 404, f"no such group {to}"))
                continue
            if sender not in members:
                results.append((REFUSED, 403, f"you are not a member of group {to}"))
                continue
            cur = execute(_INSERT, (sender, cmid, KIND_GROUP, to, None, body, now))
            msg_id = int(cur.lastrowid or 0)
            deliveries = []
            for uid in members:
                if uid != sender:
                    seq = (heads.get(uid) or 0) + 1
                    heads.seqs[uid] = seq
                    rows.append((uid, seq, msg_id))
                    deliveries.append((uid, seq))
            results.append((STORED, msg_id, now, tuple(deliveries)))
    if rows:
        db.conn.executemany("INSERT INTO inbox (uid, seq, msg_id) VALUES (?, ?, ?)", rows)
    heads.write()
    return results, [_ack(execute, heads, uid, seq) for uid, seq in acks]


def _members(execute: Any, gid: int) -> list[int] | None:
    if execute("SELECT 1 FROM groups WHERE id = ?", (gid,)).fetchone() is None:
        return None
    return [r[0] for r in execute("SELECT uid FROM group_members WHERE gid = ?", (gid,))]


def _ack(execute: Any, heads: _Heads, uid: int, seq: int) -> AckResult:
    """Move the user's ack cursor up to ``seq`` (never past the inbox head)."""
    row = execute("SELECT max_seq, acked_seq FROM inboxes WHERE uid = ?", (uid,)).fetchone()
    if row is None:
        return uid, 0, ()
    head = heads.seqs.get(uid, row[0])
    acked = row[1]
    upto = min(seq, head)
    if upto <= acked:
        return uid, acked, ()
    execute("UPDATE inboxes SET acked_seq = ? WHERE uid = ?", (upto, uid))
    newly = execute(
        "SELECT m.sender, m.cmid, m.id FROM inbox i JOIN messages m ON m.id = i.msg_id "
        "WHERE i.uid = ? AND i.seq > ? AND i.seq <= ? AND m.kind = 0 ORDER BY i.seq",
        (uid, acked, upto),
    ).fetchall()
    return uid, upto, tuple(newly)


def inbox_txn(
    db: sqlite_utils.Database, uid: int, after: int, limit: int
) -> tuple[list[tuple[int, int, int, int | None, str | bytes, int]], int]:
    """Inbox entries with seq > ``after``, oldest first, and the inbox head:
    ``([(seq, msg_id, from, group or None, body, ts)], max)``."""
    entries = db.execute(
        "SELECT i.seq, m.id, m.sender, CASE m.kind WHEN 1 THEN m.target END, m.body, m.ts "
        "FROM inbox i JOIN messages m ON m.id = i.msg_id "
        "WHERE i.uid = ? AND i.seq > ? ORDER BY i.seq LIMIT ?",
        (uid, after, limit),
    ).fetchall()
    return entries, inbox_max_txn(db, uid)


def status_txn(db: sqlite_utils.Database, uid: int, msg_ids: list[int]) -> list[int]:
    """Which of the user's sent 1:1 messages the receiver has acked."""
    delivered: list[int] = []
    for start in range(0, len(msg_ids), 500):
        chunk = msg_ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        delivered += [
            row[0]
            for row in db.execute(
                "SELECT m.id FROM messages m JOIN inboxes h ON h.uid = m.target "
                f"WHERE m.sender = ? AND m.kind = 0 AND m.id IN ({marks}) "
                "AND m.seq <= h.acked_seq ORDER BY m.id",
                (uid, *chunk),
            )
        ]
    return delivered
