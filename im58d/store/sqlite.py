"""The SQLite store: one database thread, group commit, numbered migrations.

Functions whose names end in ``_txn`` run on the database thread inside a
transaction: they take the sqlite-utils ``Database`` first and return plain
data.  ``im58d-admin`` calls the same functions directly, without a reactor.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import sqlite_utils
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .accounts import (
    add_user_txn,
    create_group_txn,
    disabled_users_txn,
    friends_of_txn,
    list_users_txn,
    list_versions_txn,
    login_record_txn,
    make_friends_txn,
    set_disabled_txn,
    set_password_txn,
    uid_for_name_txn,
    user_states_txn,
)
from .inbox import (
    AckResult,
    Entry,
    Submitted,
    deliver_txn,
    inbox_heads_txn,
    inbox_txn,
    status_txn,
)
from .interfaces import IStore, StoreError
from .lists import (
    add_category_txn,
    add_member_txn,
    categories_txn,
    friend_requests_txn,
    friends_txn,
    groups_sync_txn,
    groups_txn,
    members_txn,
    new_group_txn,
    remove_friend_txn,
    remove_member_txn,
    request_friend_txn,
    set_category_txn,
    update_profile_txn,
    users_sync_txn,
    versions_txn,
)
from .reports import record_report_txn, stats_txn, top_keys_txn
from .sessions import (
    devices_txn,
    end_sessions_txn,
    online_sessions_txn,
    resume_txn,
    session_by_token_txn,
    session_txn,
    set_offline_txn,
    sign_in_txn,
    sign_out_txn,
    stale_sessions_txn,
)

log = Logger()

SYNCHRONOUS_MODES = ("normal", "full", "extra")


def schema_scripts() -> list[tuple[int, str]]:
    """The numbered schema scripts shipped with the package, in order."""
    scripts = []
    for entry in resources.files(__package__).joinpath("schema").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            scripts.append((int(name[:3]), entry.read_text("utf-8")))
    scripts.sort()
    return scripts


def schema_version(db: sqlite_utils.Database) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the schema up to the newest version; each step is atomic."""
    scripts = schema_scripts()
    version = schema_version(db)
    latest = scripts[-1][0]
    if version > latest:
        raise StoreError(
            f"the database has schema version {version}, newer than this "
            f"im58d knows ({latest}); upgrade im58d"
        )
    for number, sql in scripts:
        if number <= version:
            continue
        try:
            db.conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;"
            )
        except sqlite3.Error:
            if db.conn.in_transaction:
                db.conn.rollback()
            # another process (a second node, im58d-admin) upgraded it between
            # our read of the version and our lock
            if schema_version(db) >= number:
                version = number
                continue
            raise
        log.info("database schema upgraded to version {version}", version=number)
        version = number
    return version


def _journal_mode_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL.  The switch takes an exclusive lock without waiting
    on busy_timeout, so when another process opens the same new file at the
    same moment it is tried again for up to 10 seconds (at start only)."""
    for _ in range(100):
        try:
            return str(conn.execute("PRAGMA journal_mode = wal").fetchone()[0])
        except sqlite3.OperationalError as e:
            if "locked" not in str(e):
                raise
            time.sleep(0.1)
    return str(conn.execute("PRAGMA journal_mode = wal").fetchone()[0])


def private_file(path: str) -> None:
    """Make the database file private to this user if it is new, and refuse
    one that others can read: it holds every session key."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreError(f"cannot use database {path}: {e.strerror}") from None
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o066:
        raise StoreError(
            f"{path} can be read or written by other users (mode {mode:04o}), and it holds "
            f"session keys; make it private to the daemon's user: chmod 600 {path}"
        )


def open_database(path: str, synchronous: str = "normal") -> sqlite_utils.Database:
    """Open (or create) and migrate the database at ``path``.

    Raises ``StoreError`` with a one-line reason when it cannot be used.
    """
    if synchronous not in SYNCHRONOUS_MODES:
        raise StoreError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
    private_file(path)
    conn = None
    try:
        # isolation_level=None: transactions are begun and ended explicitly.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        if path != ":memory:":
            mode = _journal_mode_wal(conn)
            if mode != "wal":
                raise StoreError(f"cannot use WAL journal mode on {path} (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        db = sqlite_utils.Database(conn, execute_plugins=False)
        migrate(db)
        return db
    except sqlite3.Error as e:
        if conn is not None:
            conn.close()
        raise StoreError(f"cannot use database {path}: {e}") from None
    except StoreError:
        if conn is not None:
            conn.close()
        raise


# -- the database thread ----------------------------------------------------

Operation = tuple[Callable[..., Any], tuple[Any, ...], "Deferred[Any]", bool]


class DatabaseThread:
    """The one thread that owns the database connection.

    Jobs go in through a queue; each result comes back to the reactor thread
    with one ``callFromThread``: a lighter hand-off than a thread pool's.
    """

    def __init__(self, reactor: Any, name: str = "im58d-db") -> None:
        self._reactor = reactor
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._jobs.put((fn, args, d))
        return d

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _work(self) -> None:
        call = self._reactor.callFromThread
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, d = job
            try:
                result = fn(*args)
            except BaseException:
                call(d.errback, Failure())
            else:
                call(d.callback, result)


@implementer(IStore)
class SQLiteStore:
    """An ``IStore`` on one SQLite database, used from one dedicated thread.

    Operations queue up while the thread is busy; each round takes the whole
    queue and runs it as one transaction (group commit).  When several
    operations share a round, each runs in its own savepoint, so that one
    failing operation does not undo the others.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        synchronous: str = "normal",
        thread: Any = None,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self._reactor = reactor
        # tests may pass a runner that does the work at once
        self._thread = thread or DatabaseThread(reactor)
        self._db: sqlite_utils.Database | None = None
        self._queue: list[Operation] = []
        self._busy = False
        self._flush_scheduled = False
        self._drained: list[Deferred[None]] = []
        self.batches = 0
        self.operations = 0
        # called once per transaction with (batch, seconds it took): metrics
        self.on_batch: Callable[[list[Operation], float], None] | None = None
        self._batch_started = 0.0
        # client log reports: batches counted, and repeats counted once before
        self.report_batches = 0
        self.report_repeats = 0

    # lifecycle

    def start(self) -> Deferred[None]:
        self._thread.start()
        d: Deferred[None] = self._thread.submit(self._open_in_thread)
        return d

    def _open_in_thread(self) -> None:
        self._db = open_database(self.path, self.synchronous)
        # savepoints and sorts keep their scratch data in memory, not in
        # temporary files
        self._db.conn.execute("PRAGMA temp_store = MEMORY")

    def stop(self) -> Deferred[None]:
        d = self._wait_drained()

        def close(_: object) -> Deferred[None]:
            closed: Deferred[None] = self._thread.submit(self._close_in_thread)
            closed.addBoth(self._stop_thread)
            return closed

        d.addCallback(close)
        return d

    def _close_in_thread(self) -> None:
        if self._db is not None:
            self._db.conn.close()
            self._db = None

    def _stop_thread(self, result: object) -> object:
        self._thread.stop()
        return result

    def _wait_drained(self) -> Deferred[None]:
        if not self._busy and not self._queue:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    # the queue

    def _run(
        self, fn: Callable[..., Any], *args: Any, write: bool = True, at_once: bool = False
    ) -> Deferred[Any]:
        """Queue ``fn(db, *args)`` for the next transaction.

        Without ``at_once`` the transaction starts on the next reactor turn,
        so that everything submitted in this turn joins it; callers that have
        gathered a turn's work themselves pass ``at_once``.
        """
        d: Deferred[Any] = Deferred()
        self._queue.append((fn, args, d, write))
        if not self._busy:
            if at_once:
                self._flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._busy or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._busy = True
        self._batch_started = self._reactor.seconds()
        d = self._thread.submit(self._run_batch, batch)
        d.addBoth(self._batch_done, batch)

    def _run_batch(self, batch: list[Operation]) -> list[tuple[bool, Any]]:
        """On the database thread: the whole batch in one transaction."""
        db = self._db
        if db is None:
            raise StoreError(f"database {self.path} is not open")
        conn = db.conn
        write = any(op[3] for op in batch)
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            if len(batch) == 1:
                fn, args, _, _ = batch[0]
                try:
                    results.append((True, fn(db, *args)))
                except Exception:
                    # alone in its transaction: undo it all
                    conn.execute("ROLLBACK")
                    return [(False, Failure())]
            else:
                for fn, args, _, _ in batch:
                    conn.execute("SAVEPOINT op")
                    try:
                        results.append((True, fn(db, *args)))
                    except Exception:
                        results.append((False, Failure()))
                        conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    def _batch_done(
        self, outcome: list[tuple[bool, Any]] | Failure, batch: list[Operation]
    ) -> None:
        self.batches += 1
        self.operations += len(batch)
        if self.on_batch is not None:
            self.on_batch(batch, self._reactor.seconds() - self._batch_started)
        if isinstance(outcome, Failure):
            log.failure("database transaction failed", outcome)
            for _, _, d, _ in batch:
                d.errback(outcome)
        else:
            for (_, _, d, _), (ok, value) in zip(batch, outcome, strict=True):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        self._busy = False
        if self._queue:
            self._flush()
        elif self._drained:
            waiting, self._drained = self._drained, []
            for waiter in waiting:
                waiter.callback(None)

    # IStore

    def add_user(self, name: str, password_hash: str, now: int) -> Deferred[int]:
        return self._run(add_user_txn, name, password_hash, now)

    def set_password(self, name: str, password_hash: str) -> Deferred[int]:
        return self._run(set_password_txn, name, password_hash)

    def set_disabled(self, name: str, disabled: bool) -> Deferred[int]:
        return self._run(set_disabled_txn, name, disabled)

    def list_users(self) -> Deferred[list[dict[str, Any]]]:
        return self._run(list_users_txn, write=False)

    def disabled_users(self) -> Deferred[list[int]]:
        return self._run(disabled_users_txn, write=False)

    def login_record(self, name: str) -> Deferred[tuple[int, str, bool] | None]:
        return self._run(login_record_txn, name, write=False)

    def uid_for_name(self, name: str) -> Deferred[int | None]:
        return self._run(uid_for_name_txn, name, write=False)

    def make_friends(self, uid1: int, uid2: int, now: int) -> Deferred[None]:
        return self._run(make_friends_txn, uid1, uid2, now)

    def create_group(
        self, name: str, owner: int, members: list[int], now: int, intro: str = "",
        limit: int | None = None,
    ) -> Deferred[int]:
        return self._run(create_group_txn, name, owner, members, now, intro, limit)

    def versions(self, uid: int) -> Deferred[dict[str, int]]:
        return self._run(versions_txn, uid, write=False)

    def friends(self, uid: int) -> Deferred[tuple[int, list[list[int]]]]:
        return self._run(friends_txn, uid, write=False)

    def categories(self, uid: int) -> Deferred[tuple[int, list[list[Any]]]]:
        return self._run(categories_txn, uid, write=False)

    def groups(self, uid: int) -> Deferred[tuple[int, list[int]]]:
        return self._run(groups_txn, uid, write=False)

    def users_sync(self, uid: int, have: dict[int, int]) -> Deferred[list[dict[str, Any]]]:
        return self._run(users_sync_txn, uid, have, write=False)

    def groups_sync(self, uid: int, have: dict[int, int]) -> Deferred[list[dict[str, Any]]]:
        return self._run(groups_sync_txn, uid, have, write=False)

    def members(self, uid: int, gid: int) -> Deferred[tuple[int, list[int]]]:
        return self._run(members_txn, uid, gid, write=False)

    def friend_requests(self, uid: int) -> Deferred[tuple[int, list[dict[str, int]]]]:
        return self._run(friend_requests_txn, uid, write=False)

    def update_profile(self, uid: int, changes: dict[str, Any]) -> Deferred[int]:
        return self._run(update_profile_txn, uid, changes)

    def request_friend(
        self, uid: int, other: int, category: int, now: int
    ) -> Deferred[tuple[bool, list[int]]]:
        return self._run(request_friend_txn, uid, other, category, now)

    def remove_friend(self, uid: int, other: int) -> Deferred[list[int]]:
        return self._run(remove_friend_txn, uid, other)

    def add_category(self, uid: int, name: str) -> Deferred[tuple[int, int]]:
        return self._run(add_category_txn, uid, name)

    def set_category(self, uid: int, friend: int, category: int) -> Deferred[int]:
        return self._run(set_category_txn, uid, friend, category)

    def new_group(
        self, uid: int, name: str, intro: str, members: list[int], limit: int, now: int
    ) -> Deferred[tuple[int, int, list[int]]]:
        return self._run(new_group_txn, uid, name, intro, members, limit, now)

    def add_member(
        self, uid: int, gid: int, new: int, limit: int, now: int
    ) -> Deferred[tuple[list[int], int, int]]:
        return self._run(add_member_txn, uid, gid, new, limit, now)

    def remove_member(
        self, uid: int, gid: int, target: int
    ) -> Deferred[tuple[list[int], int, int]]:
        return self._run(remove_member_txn, uid, gid, target)

    def friends_of(self, uid: int) -> Deferred[list[int]]:
        return self._run(friends_of_txn, uid, write=False)

    def user_states(self, uids: list[int]) -> Deferred[dict[int, dict[str, Any]]]:
        return self._run(user_states_txn, uids, write=False)

    def list_versions(self, uids: list[int]) -> Deferred[dict[int, tuple[int, ...]]]:
        return self._run(list_versions_txn, uids, write=False)

    def deliver(
        self,
        messages: list[Submitted],
        acks: list[tuple[int, int, int, int]],
        now: int,
        friends_only: bool = False,
    ) -> Deferred[tuple[list[tuple[Any, ...]], list[AckResult]]]:
        return self._run(deliver_txn, messages, acks, now, friends_only, at_once=True)

    def inbox_heads(self, uids: list[int]) -> Deferred[dict[int, tuple[int, int]]]:
        return self._run(inbox_heads_txn, uids, write=False)

    def inbox(self, uid: int, after: int, limit: int) -> Deferred[tuple[list[Entry], int]]:
        return self._run(inbox_txn, uid, after, limit, write=False)

    def status(self, uid: int, msg_ids: list[int]) -> Deferred[list[int]]:
        return self._run(status_txn, uid, msg_ids, write=False)

    # devices and sessions

    def sign_in(
        self, uid: int, device_id: bytes, name: str, client: str | None, session_id: bytes,
        key: bytes, token: str, now: int, max_devices: int, online: bool,
    ) -> Deferred[dict[str, Any]]:
        return self._run(sign_in_txn, uid, device_id, name, client, session_id, key, token,
                         now, max_devices, online)

    def session(self, session_id: bytes) -> Deferred[dict[str, Any] | None]:
        return self._run(session_txn, session_id, write=False)

    def session_by_token(self, token: str) -> Deferred[dict[str, Any] | None]:
        return self._run(session_by_token_txn, token, write=False)

    def resume(self, session_id: bytes, nonce: bytes, now: int) -> Deferred[dict[str, Any] | None]:
        return self._run(resume_txn, session_id, nonce, now)

    def set_offline(self, session_ids: list[bytes], now: int) -> Deferred[None]:
        return self._run(set_offline_txn, session_ids, now)

    def online_sessions(self) -> Deferred[list[dict[str, Any]]]:
        return self._run(online_sessions_txn, write=False)

    def sign_out(
        self, uid: int, device_id: bytes | None, session_id: bytes | None
    ) -> Deferred[bytes | None]:
        return self._run(sign_out_txn, uid, device_id, session_id)

    def end_sessions(self, session_ids: list[bytes]) -> Deferred[list[int]]:
        return self._run(end_sessions_txn, session_ids)

    def stale_sessions(self, unused_since: int) -> Deferred[list[tuple[int, bytes]]]:
        return self._run(stale_sessions_txn, unused_since, write=False)

    def devices(self, uid: int) -> Deferred[tuple[int, list[dict[str, Any]]]]:
        return self._run(devices_txn, uid, write=False)

    # client log reports

    def record_report(
        self, uid: int, batch_id: str, counts: dict[str, int], now: int
    ) -> Deferred[bool]:
        d: Deferred[bool] = self._run(record_report_txn, uid, batch_id, counts, now)
        return d.addCallback(self._report_counted)

    def _report_counted(self, counted: bool) -> bool:
        if counted:
            self.report_batches += 1
        else:
            self.report_repeats += 1
        return counted

    def stats(self, key: str, days: int, now: int) -> Deferred[list[dict[str, Any]]]:
        return self._run(stats_txn, key, days, now, write=False)

    def top_keys(self, days: int, limit: int, now: int) -> Deferred[list[dict[str, Any]]]:
        return self._run(top_keys_txn, days, limit, now, write=False)
