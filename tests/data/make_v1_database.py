"""Make ``v1.sqlite``: a database as im58d of contract version 1 left it.

Run with the version-1 code (git commit 1d7df45) first on the path, from a
checkout of it, so that the file is what that code wrote::

    git worktree add /tmp/im58d-v1 1d7df45
    PYTHONPATH=/tmp/im58d-v1 python3 tests/data/make_v1_database.py tests/data/v1.sqlite

The contents (uids 1 alice, 2 bob, 3 carol, passwords "pw"; every
timestamp fixed) are what tests/test_migration.py expects.
"""

from __future__ import annotations

import os
import sys

from im58d.logic.passwords import hash_password
from im58d.store.accounts import add_user_txn, create_group_txn, make_friends_txn
from im58d.store.inbox import deliver_txn
from im58d.store.lists import request_friend_txn
from im58d.store.reports import record_report_txn
from im58d.store.sqlite import open_database, schema_version

T0 = 1_700_000_000


def main(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)
    db = open_database(path)
    assert schema_version(db) == 3, "run this with the version-1 code on the path"
    conn = db.conn
    conn.execute("BEGIN")
    password = hash_password("pw", n=16)
    alice, bob, carol = (add_user_txn(db, name, password, T0) for name in ("alice", "bob", "carol"))
    make_friends_txn(db, alice, bob, T0)
    team = create_group_txn(db, "team", alice, [bob, carol], T0)
    request_friend_txn(db, carol, alice, 0, T0)
    # alice -> bob cmids 1..3; bob -> alice cmid 1; carol -> team cmid 1;
    # a note alice wrote to herself
    deliver_txn(db, [
        (alice, 1, bob, "one", 0),
        (alice, 2, bob, "two", 0),
        (alice, 3, bob, "three", 0),
        (bob, 1, alice, "hello alice", 0),
        (carol, 1, team, "hello team", 1),
        (alice, 4, alice, "note to self", 0),
    ], [], T0 + 10)
    # bob received alice's first two (and nothing of the group yet); alice
    # received everything
    deliver_txn(db, [], [(bob, 2), (alice, 3)], T0 + 20)
    record_report_txn(db, alice, "batch-1", {"click.send": 3}, T0 + 30)
    conn.execute("COMMIT")
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
