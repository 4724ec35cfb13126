"""Client log reports (PROTOCOL.md section 3): functions for the database thread.

A batch adds its counts to per-day counters per key (``report_counts``) and
records the reporting user as a distinct user of each of its keys for that
day (``report_users``); ``report_counts.users`` (schema 3) keeps the number
of distinct users beside the count, so that reading a day is one row.  The
batch id goes into ``report_batches`` first: a batch id the user sent before
counts nothing.  Days are UTC days of the server's receipt time.
"""

from __future__ import annotations

import datetime
from typing import Any

import sqlite_utils

# A batch id is remembered this long after its receipt; a client retries a
# batch for at most ``im58d.client.report.MAX_AGE`` (7 days), well within it.
BATCH_KEEP = 30 * 86400


def day_of(now: float) -> str:
    """The UTC day of a Unix time, ``YYYY-MM-DD``."""
    return datetime.datetime.fromtimestamp(int(now), datetime.UTC).date().isoformat()


def window(days: int, now: float) -> list[str]:
    """The last ``days`` UTC days up to the day of ``now``, oldest first."""
    today = datetime.datetime.fromtimestamp(int(now), datetime.UTC).date()
    return [(today - datetime.timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]


def record_report_txn(
    db: sqlite_utils.Database, uid: int, batch_id: str, counts: dict[str, int], now: int
) -> bool:
    """Count a batch of ``{key: count}`` for ``uid`` on the day of ``now``;
    False (and nothing counted) when the user sent this batch id before."""
    conn = db.conn
    conn.execute("DELETE FROM report_batches WHERE ts < ?", (now - BATCH_KEEP,))
    cursor = conn.execute(
        "INSERT OR IGNORE INTO report_batches (uid, batch, ts) VALUES (?, ?, ?)",
        (uid, batch_id, now),
    )
    if cursor.rowcount == 0:
        return False
    day = day_of(now)
    for key, count in counts.items():
        new_user = conn.execute(
            "INSERT OR IGNORE INTO report_users (day, key, uid) VALUES (?, ?, ?)",
            (day, key, uid),
        ).rowcount
        conn.execute(
            "INSERT INTO report_counts (day, key, count, users) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (day, key) DO UPDATE SET count = count + excluded.count, "
            "users = users + excluded.users",
            (day, key, count, new_user),
        )
    return True


def stats_txn(db: sqlite_utils.Database, key: str, days: int, now: int) -> list[dict[str, Any]]:
    """``[{"day", "count", "users"}]`` of one key for each of the last
    ``days`` days (today included), oldest first; zeros for days without data."""
    span = window(days, now)
    rows = db.execute(
        "SELECT day, count, users FROM report_counts WHERE key = ? AND day >= ? AND day <= ?",
        (key, span[0], span[-1]),
    ).fetchall()
    found = {day: (count, users) for day, count, users in rows}
    return [
        {"day": day, "count": found.get(day, (0, 0))[0], "users": found.get(day, (0, 0))[1]}
        for day in span
    ]


def top_keys_txn(
    db: sqlite_utils.Database, days: int, limit: int, now: int
) -> list[dict[str, Any]]:
    """The ``limit`` keys with the biggest counts over the last ``days`` days:
    ``[{"key", "count", "users"}]``, biggest count first (then by key);
    ``users`` counts each user once over the whole window."""
    span = window(days, now)
    rows = db.execute(
        "SELECT key, sum(count) AS total FROM report_counts WHERE day >= ? AND day <= ? "
        "GROUP BY key ORDER BY total DESC, key LIMIT ?",
        (span[0], span[-1], limit),
    ).fetchall()
    # day IN (...) AND key = ?: one primary-key lookup per day
    marks = ",".join("?" * len(span))
    result = []
    for key, total in rows:
        (users,) = db.execute(
            f"SELECT count(DISTINCT uid) FROM report_users WHERE day IN ({marks}) AND key = ?",
            (*span, key),
        ).fetchone()
        result.append({"key": key, "count": int(total), "users": int(users)})
    return result
