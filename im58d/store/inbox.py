"""Messages, inboxes and acks (functions for the database thread).

``deliver_txn`` is the message path's one transaction per batch: it stores
the batch's messages (de-duplicated by sender and cmid), appends them to the
receivers' inboxes with the next seqs, and records the batch's acks.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlite_utils

KIND_USER = 0
KIND_GROUP = 1

# outcome of one message of a batch:
#   (STORED, msg_id, ts, ((uid, seq), ...))  the receivers' inbox entries
#   (DUPLICATE, msg_id, ts, delivered)       stored before under this cmid;
#                                            delivered: the receiver acked it
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


# Lookups go in statements with a few fixed numbers of placeholders (the
# list padded with its first entry), so that sqlite3 reuses the prepared
# statements: preparing a statement of a new shape costs more than running it.
_SIZES = (1, 4, 16, 64, 256)


@functools.lru_cache(maxsize=64)
def _placeholders(width: int, rows: int) -> str:
    """``?,?,?`` (width 1) or ``(?,?),(?,?)`` (width 2 and more)."""
    one = "?" if width == 1 else "(" + ",".join("?" * width) + ")"
    return ",".join([one] * rows)


def _lookup(
    execute: Any, sql: str, keys: list[Any], width: int = 1, pad: Any = None
) -> list[Any]:
    """The rows of ``sql`` (whose ``{}`` takes the key list) for every key.

    The list is padded with ``pad``, or else with its first key, whose rows
    then repeat: callers collect such rows in dicts or sets.
    """
    rows: list[Any] = []
    for start in range(0, len(keys), _SIZES[-1]):
        chunk = keys[start : start + _SIZES[-1]]
        size = next(n for n in _SIZES if n >= len(chunk))
        chunk = chunk + [chunk[0] if pad is None else pad] * (size - len(chunk))
        params = chunk if width == 1 else [value for key in chunk for value in key]
        rows += execute(sql.format(_placeholders(width, size)), params).fetchall()
    return rows


def deliver_txn(
    db: sqlite_utils.Database,
    messages: list[Submitted],
    acks: list[tuple[int, int]],
    now: int,
    friends_only: bool = False,
) -> tuple[list[tuple[Any, ...]], list[AckResult]]:
    """Store and route a batch of messages and record a batch of acks.

    The batch's de-dup keys, inbox heads and group members are each read in
    one statement, seqs and ids are given out here (the transaction holds
    the write lock), and rows are written with ``executemany``.
    """
    conn = db.conn
    execute = conn.execute
    # 1. de-duplication: within the batch, then against what is stored
    first: dict[tuple[int, int], int] = {}
    for i, message in enumerate(messages):
        first.setdefault((message[0], message[1]), i)
    earlier = {
        (row[0], row[1]): (row[2], row[3], row[4] is not None and row[4] <= row[5])
        for row in _lookup(
            execute,
            "SELECT m.sender, m.cmid, m.id, m.ts, m.seq, h.acked_seq FROM (VALUES {}) v "
            "JOIN messages m ON m.sender = v.column1 AND m.cmid = v.column2 "
            "LEFT JOIN inboxes h ON m.kind = 0 AND h.uid = m.target",
            list(first),
            2,
        )
    }
    new = [i for key, i in first.items() if key not in earlier]
    # 2. the groups, friendships and inboxes the batch touches
    gids = list({messages[i][2] for i in new if messages[i][4] == KIND_GROUP})
    members: dict[int, list[int]] = {}
    if gids:
        for (gid,) in _lookup(execute, "SELECT id FROM groups WHERE id IN ({})", gids):
            members[gid] = []
        if members:
            for gid, uid in set(_lookup(
                execute, "SELECT gid, uid FROM group_members WHERE gid IN ({})", list(members)
            )):
                members[gid].append(uid)
    friends: set[tuple[int, int]] = set()
    if friends_only:
        pairs = list({(messages[i][0], messages[i][2]) for i in new
                      if messages[i][4] == KIND_USER})
        friends = {
            (row[0], row[1])
            for row in _lookup(execute, "SELECT f.uid, f.friend FROM (VALUES {}) v "
                               "JOIN friends f ON f.uid = v.column1 AND f.friend = v.column2",
                               pairs, 2)
        }
    uids = {messages[i][2] for i in new if messages[i][4] == KIND_USER}
    for group in members.values():
        uids.update(group)
    uids.update(uid for uid, _ in acks)
    heads: dict[int, list[int]] = {
        row[0]: [row[1], row[2]]
        for row in _lookup(
            execute, "SELECT uid, max_seq, acked_seq FROM inboxes WHERE uid IN ({})", list(uids)
        )
    }
    # an ack can only cover what was committed before this batch
    ackable = {uid: head[0] for uid, head in heads.items()}
    touched: set[int] = set()
    # 3. seqs and ids
    next_id = (execute("SELECT max(id) FROM messages").fetchone()[0] or 0) + 1
    message_rows: list[tuple[Any, ...]] = []
    inbox_rows: list[tuple[int, int, int]] = []
    results: list[tuple[Any, ...]] = [()] * len(messages)
    for i, (sender, cmid, to, body, kind) in enumerate(messages):
        key = (sender, cmid)
        j = first[key]
        if j != i:  # a repeat within the batch: the answer of the first copy
            done = results[j]
            results[i] = (DUPLICATE, done[1], done[2], False) if done[0] != REFUSED else done
            continue
        stored = earlier.get(key)
        if stored is not None:
            results[i] = (DUPLICATE, stored[0], stored[1], stored[2])
            continue
        if kind == KIND_USER:
            head = heads.get(to)
            if head is None:
                results[i] = (REFUSED, 404, f"no such user {to}")
                continue
            if friends_only and to != sender and (sender, to) not in friends:
                results[i] = (REFUSED, 403, f"user {to} is not your friend")
                continue
            head[0] += 1
            touched.add(to)
            msg_id = next_id
            next_id += 1
            message_rows.append((msg_id, sender, cmid, KIND_USER, to, head[0], body, now))
            inbox_rows.append((to, head[0], msg_id))
            results[i] = (STORED, msg_id, now, ((to, head[0]),))
        else:
            group_members = members.get(to)
            if group_members is None:
                results[i] = (REFUSED, 404, f"no such group {to}")
                continue
            if sender not in group_members:
                results[i] = (REFUSED, 403, f"you are not a member of group {to}")
                continue
            msg_id = next_id
            next_id += 1
            message_rows.append((msg_id, sender, cmid, KIND_GROUP, to, None, body, now))
            deliveries = []
            for uid in group_members:
                if uid != sender:
                    head = heads[uid]
                    head[0] += 1
                    touched.add(uid)
                    inbox_rows.append((uid, head[0], msg_id))
                    deliveries.append((uid, head[0]))
            results[i] = (STORED, msg_id, now, tuple(deliveries))
    # 4. acks: move the cursors (never past the head as it was before)
    ack_results: list[AckResult] = []
    spans: list[tuple[int, int, int, int]] = []  # (result index, uid, from, to)
    for uid, seq in acks:
        head = heads.get(uid)
        if head is None:
            ack_results.append((uid, 0, ()))
            continue
        upto = min(seq, ackable[uid])
        acked = head[1]
        if upto <= acked:
            ack_results.append((uid, acked, ()))
            continue
        head[1] = upto
        touched.add(uid)
        spans.append((len(ack_results), uid, acked, upto))
        ack_results.append((uid, upto, ()))
    # 5. the writes
    if message_rows:
        conn.executemany(
            "INSERT INTO messages (id, sender, cmid, kind, target, seq, body, ts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            message_rows,
        )
        conn.executemany("INSERT INTO inbox (uid, seq, msg_id) VALUES (?, ?, ?)", inbox_rows)
    if touched:
        conn.executemany(
            "UPDATE inboxes SET max_seq = ?, acked_seq = ? WHERE uid = ?",
            [(heads[uid][0], heads[uid][1], uid) for uid in touched],
        )
    # 6. the 1:1 messages each ack made delivered, for ACK_N
    if spans:
        newly: dict[int, list[tuple[int, int, int]]] = {}
        for uid, sender, cmid, msg_id in _lookup(
            execute,
            "SELECT r.column1, m.sender, m.cmid, m.id FROM (VALUES {}) r "
            "JOIN inbox i ON i.uid = r.column1 AND i.seq > r.column2 AND i.seq <= r.column3 "
            "JOIN messages m ON m.id = i.msg_id WHERE m.kind = 0 ORDER BY i.uid, i.seq",
            [(uid, lo, hi) for _, uid, lo, hi in spans],
            3,
            pad=(0, 0, 0),  # matches nothing
        ):
            newly.setdefault(uid, []).append((sender, cmid, msg_id))
        for n, uid, _, hi in spans:
            ack_results[n] = (uid, hi, tuple(newly.get(uid, ())))
    return results, ack_results


def inbox_heads_txn(db: sqlite_utils.Database, uids: list[int]) -> dict[int, tuple[int, int]]:
    """``{uid: (max_seq, acked_seq)}`` for the users with an inbox."""
    heads: dict[int, tuple[int, int]] = {}
    for start in range(0, len(uids), 500):
        chunk = uids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for uid, max_seq, acked in db.execute(
            f"SELECT uid, max_seq, acked_seq FROM inboxes WHERE uid IN ({marks})", chunk
        ):
            heads[uid] = (max_seq, acked)
    return heads


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
