"""Messages, timelines and acks (functions for the database thread).

``deliver_txn`` is the message path's one transaction per batch: it stores
the batch's messages (de-duplicated by sender, device and cmid), gives each
an entry with the next seq in the sender's timeline and in every
receiver's, and records the batch's acks (per device cursors).
"""

from __future__ import annotations

import functools
from typing import Any

import sqlite_utils

from .interfaces import DUPLICATE, KIND_GROUP, KIND_USER, REFUSED, STORED

# A message to deliver: (sender, device, cmid, to, body, kind); an ack:
# (uid, device, seq, the device's cursor as the store last said it).
Submitted = tuple[int, int, int, int, "str | bytes", int]
# (the device's cursor now, ((sender, sender_seq), ...) of the 1:1 messages
# the ack made delivered)
AckResult = tuple[int, tuple[tuple[int, int], ...]]


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
    acks: list[tuple[int, int, int, int]],
    now: int,
    friends_only: bool = False,
) -> tuple[list[tuple[Any, ...]], list[AckResult]]:
    """Store a batch of messages and record a batch of acks.

    The batch's de-dup keys, timeline heads and group members are each read
    in one statement, seqs and ids are given out here (the transaction holds
    the write lock), and rows are written with ``executemany``.  A device's
    cursor comes with its ack (the node that holds the device is the only
    writer of it); the write never moves it back all the same.
    """
    conn = db.conn
    execute = conn.execute
    # 1. de-duplication: within the batch, then against what is stored
    first: dict[tuple[int, int, int], int] = {}
    for i, message in enumerate(messages):
        first.setdefault((message[0], message[1], message[2]), i)
    earlier = {
        (row[0], row[1], row[2]): row[3:]
        for row in _lookup(
            execute,
            "SELECT m.sender, m.device, m.cmid, m.id, m.sender_seq, m.target, m.body, m.kind, "
            "m.kind = 0 AND m.seq <= h.acked_seq FROM (VALUES {}) v "
            "JOIN messages m ON m.sender = v.column1 AND m.device = v.column2 "
            "AND m.cmid = v.column3 "
            "LEFT JOIN inboxes h ON m.kind = 0 AND h.uid = m.target",
            list(first),
            3,
        )
    }
    new = [i for key, i in first.items() if key not in earlier]
    # 2. the groups, friendships and timelines the batch touches
    gids = list({messages[i][3] for i in new if messages[i][5] == KIND_GROUP})
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
        pairs = list({(messages[i][0], messages[i][3]) for i in new
                      if messages[i][5] == KIND_USER})
        friends = {
            (row[0], row[1])
            for row in _lookup(execute, "SELECT f.uid, f.friend FROM (VALUES {}) v "
                               "JOIN friends f ON f.uid = v.column1 AND f.friend = v.column2",
                               pairs, 2)
        }
    uids = set()
    for i in new:
        message = messages[i]
        uids.add(message[0])
        if message[5] == KIND_USER:
            uids.add(message[3])
    for group in members.values():
        uids.update(group)
    uids.update(ack[0] for ack in acks)
    # [head, highest cursor, the device that holds it]
    heads: dict[int, list[int]] = {
        row[0]: [row[1], row[2], row[3]]
        for row in _lookup(
            execute,
            "SELECT uid, max_seq, acked_seq, acked_device FROM inboxes WHERE uid IN ({})",
            list(uids),
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
    for i, (sender, device, cmid, to, body, kind) in enumerate(messages):
        key = (sender, device, cmid)
        j = first[key]
        if j != i:  # a repeat within the batch: the answer of the first copy
            done = results[j]
            original = messages[j]
            if original[3] != to or original[5] != kind or original[4] != body:
                results[i] = _reused(cmid)
            elif done[0] == STORED:
                results[i] = (DUPLICATE, done[1], done[3], False)
            else:
                results[i] = done
            continue
        stored = earlier.get(key)
        if stored is not None:
            msg_id, sender_seq, target, stored_body, stored_kind, delivered = stored
            if target != to or stored_kind != kind or stored_body != body:
                results[i] = _reused(cmid)
            else:
                results[i] = (DUPLICATE, msg_id, sender_seq, bool(delivered))
            continue
        own = heads.get(sender)
        if own is None:
            results[i] = (REFUSED, 404, f"no such user {sender}")
            continue
        if kind == KIND_USER:
            head = heads.get(to)
            if head is None:
                results[i] = (REFUSED, 404, f"no such user {to}")
                continue
            if friends_only and to != sender and (sender, to) not in friends:
                results[i] = (REFUSED, 403, f"user {to} is not your friend")
                continue
            msg_id = next_id
            next_id += 1
            own[0] += 1
            touched.add(sender)
            sender_seq = own[0]
            inbox_rows.append((sender, sender_seq, msg_id))
            if to == sender:  # a note to oneself: one entry
                seq = sender_seq
                deliveries: tuple[tuple[int, int], ...] = ()
            else:
                head[0] += 1
                touched.add(to)
                seq = head[0]
                inbox_rows.append((to, seq, msg_id))
                deliveries = ((to, seq),)
            message_rows.append(
                (msg_id, sender, device, cmid, KIND_USER, to, seq, sender_seq, body, now)
            )
            results[i] = (STORED, msg_id, now, sender_seq, deliveries)
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
            own[0] += 1
            touched.add(sender)
            sender_seq = own[0]
            inbox_rows.append((sender, sender_seq, msg_id))
            message_rows.append(
                (msg_id, sender, device, cmid, KIND_GROUP, to, None, sender_seq, body, now)
            )
            group_deliveries = []
            for uid in group_members:
                if uid != sender:
                    head = heads[uid]
                    head[0] += 1
                    touched.add(uid)
                    inbox_rows.append((uid, head[0], msg_id))
                    group_deliveries.append((uid, head[0]))
            results[i] = (STORED, msg_id, now, sender_seq, tuple(group_deliveries))
    # 4. acks: move the devices' cursors (never past the head as it was
    # before), and with them the user's highest cursor.  The device that
    # holds the highest keeps its cursor in the user's row (one write per
    # ack for a user's leading device); one that falls behind gets it back
    # in its own row.
    ack_results: list[AckResult] = []
    moved: list[tuple[int, int, int]] = []  # (cursor, device, cursor)
    spans: list[tuple[int, int, int, int]] = []  # (result index, uid, from, to)
    for uid, device, seq, cursor in acks:
        head = heads.get(uid)
        if head is None:
            ack_results.append((0, ()))
            continue
        upto = min(seq, ackable[uid])
        if upto <= cursor:
            ack_results.append((cursor, ()))
            continue
        if upto >= head[1]:  # the highest cursor now: this device holds it
            if head[2] != device:
                if head[2]:
                    moved.append((head[1], head[2], head[1]))
                head[2] = device
            if upto > head[1]:  # the first of the user's devices to get this far
                spans.append((len(ack_results), uid, head[1], upto))
            head[1] = upto
            touched.add(uid)
        else:
            moved.append((upto, device, upto))
        ack_results.append((upto, ()))
    # 5. the writes
    if message_rows:
        conn.executemany(
            "INSERT INTO messages (id, sender, device, cmid, kind, target, seq, sender_seq, "
            "body, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            message_rows,
        )
        conn.executemany("INSERT INTO inbox (uid, seq, msg_id) VALUES (?, ?, ?)", inbox_rows)
    if touched:
        conn.executemany(
            "UPDATE inboxes SET max_seq = ?, acked_seq = ?, acked_device = ? WHERE uid = ?",
            [(heads[uid][0], heads[uid][1], heads[uid][2], uid) for uid in touched],
        )
    if moved:
        conn.executemany("UPDATE devices SET acked = ? WHERE id = ? AND acked < ?", moved)
    # 6. the 1:1 messages each ack made received, for ACK_N: entries the
    # user received (a note to oneself included), not those they sent
    if spans:
        newly: dict[int, list[tuple[int, int]]] = {}
        for n, sender, sender_seq in _lookup(
            execute,
            "SELECT r.column1, m.sender, m.sender_seq FROM (VALUES {}) r "
            "JOIN inbox i ON i.uid = r.column2 AND i.seq > r.column3 AND i.seq <= r.column4 "
            "JOIN messages m ON m.id = i.msg_id "
            "WHERE m.kind = 0 AND m.target = i.uid AND m.sender_seq IS NOT NULL "
            "ORDER BY r.column1, i.seq",
            [(n, uid, lo, hi) for n, uid, lo, hi in spans],
            4,
            pad=(-1, 0, 0, 0),  # matches nothing
        ):
            newly.setdefault(n, []).append((sender, sender_seq))
        for n, _, _, _ in spans:
            ack_results[n] = (ack_results[n][0], tuple(newly.get(n, ())))
    return results, ack_results


def _reused(cmid: int) -> tuple[int, int, str]:
    return (REFUSED, 409, f"cmid {cmid} was used for another message: take a new one")


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


# A timeline entry: (seq, msg_id, from, group or None, body, ts, to or None,
# delivered or None, device); ``to`` and ``delivered`` on the user's own 1:1
# messages; ``device``: the store's key of the sending device (0 before
# version 2), for the server's own use.
Entry = tuple[
    int, int, int, "int | None", "str | bytes", int, "int | None", "bool | None", int
]


def inbox_txn(
    db: sqlite_utils.Database, uid: int, after: int, limit: int
) -> tuple[list[Entry], int]:
    """Timeline entries with seq > ``after``, oldest first, and the head."""
    entries = [
        (seq, msg_id, sender, group, body, ts, to,
         None if delivered is None else bool(delivered), device)
        for seq, msg_id, sender, group, body, ts, to, delivered, device in db.execute(
            "SELECT i.seq, m.id, m.sender, CASE m.kind WHEN 1 THEN m.target END, m.body, m.ts, "
            "h.uid, m.seq <= h.acked_seq, m.device "
            "FROM inbox i JOIN messages m ON m.id = i.msg_id "
            "LEFT JOIN inboxes h ON m.kind = 0 AND m.sender = i.uid AND h.uid = m.target "
            "WHERE i.uid = ? AND i.seq > ? ORDER BY i.seq LIMIT ?",
            (uid, after, limit),
        ).fetchall()
    ]
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
