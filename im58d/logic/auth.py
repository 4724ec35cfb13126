"""Checking credentials: attempt limiting, then scrypt off the reactor thread."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..store.interfaces import IStore
from .passwords import DUMMY_HASH, verify_password

MAX_NAME_CHARS = 64


class LoginRefused(Exception):
    """A login that does not succeed; ``code`` is the ERROR code to answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


log = Logger()

BAD_CREDENTIALS = (401, "bad user name or password")
TOO_MANY = (429, "too many failed attempts, try later")
DISABLED = (403, "account disabled")


class LoginThrottle:
    """Failed logins per user name and per address, in a sliding window,
    plus the attempts still being checked.

    Names that do not exist are counted like names that do, so the answers
    do not tell an attacker which accounts exist.  An attempt being checked
    counts against its user name at once, so a burst of parallel guesses
    cannot slip past the limit; per address only failures count (many users
    behind one NAT log in at once), with a cap on parallel checks.
    """

    def __init__(
        self,
        clock: IReactorTime,
        per_user: int = 5,
        per_address: int = 20,
        window: float = 900.0,
        parallel_per_address: int = 64,
    ) -> None:
        self._clock = clock
        self.per_user = per_user
        self.per_address = per_address
        self.window = window
        self.parallel_per_address = parallel_per_address
        self._users: dict[str, deque[float]] = {}
        self._addresses: dict[str, deque[float]] = {}
        self._checking_user: Counter[str] = Counter()
        self._checking_address: Counter[str] = Counter()

    def _count(self, table: dict[str, deque[float]], key: str) -> int:
        times = table.get(key)
        if times is None:
            return 0
        horizon = self._clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del table[key]
            return 0
        return len(times)

    def blocked(self, user: str, address: str) -> bool:
        return (
            self._count(self._users, user) + self._checking_user[user] >= self.per_user
            or self._count(self._addresses, address) >= self.per_address
            or self._checking_address[address] >= self.parallel_per_address
        )

    def attempt(self, user: str, address: str) -> None:
        """An attempt is being checked."""
        self._checking_user[user] += 1
        self._checking_address[address] += 1

    def finished(self, user: str, address: str, ok: bool) -> None:
        """The attempt was checked: a success clears the user's failures, a
        failure counts for the user and the address."""
        for table, key in ((self._checking_user, user), (self._checking_address, address)):
            table[key] -= 1
            if table[key] <= 0:
                del table[key]
        if ok:
            self._users.pop(user, None)
        else:
            now = self._clock.seconds()
            self._users.setdefault(user, deque()).append(now)
            self._addresses.setdefault(address, deque()).append(now)

    def prune(self) -> None:
        """Forget every entry older than the window (housekeeping)."""
        for table in (self._users, self._addresses):
            for key in list(table):
                self._count(table, key)


class ThreadedVerifier:
    """Runs scrypt verification on a small thread pool of its own."""

    def __init__(self, reactor: Any, threads: int = 2) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name="im58d-auth")

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def __call__(self, password: str, encoded: str) -> Deferred[bool]:
        return deferToThreadPool(
            self._reactor, self._pool, verify_password, password, encoded
        )


class Authenticator:
    """Turns ``(user, password, address)`` into a uid or a ``LoginRefused``."""

    def __init__(
        self,
        store: IStore,
        throttle: LoginThrottle,
        verify: Callable[[str, str], Deferred[bool]],
    ) -> None:
        self._store = store
        self.throttle = throttle
        self._verify = verify

    def authenticate(self, user: str, password: str, address: str) -> Deferred[int]:
        if self.throttle.blocked(user, address):
            log.warn("login refused: too many failed attempts (from {address})", address=address)
            return fail(LoginRefused(*TOO_MANY))
        self.throttle.attempt(user, address)
        return self._authenticate(user, password, address)

    @inlineCallbacks
    def _authenticate(self, user: str, password: str, address: str) -> Any:
        ok = False
        try:
            record = None
            if 0 < len(user) <= MAX_NAME_CHARS:
                record = yield self._store.login_record(user)
            encoded = DUMMY_HASH if record is None else record[1]
            ok = (yield self._verify(password, encoded)) and record is not None
        finally:
            self.throttle.finished(user, address, ok)
        if not ok:
            # the typed name is not logged: people type passwords into it
            log.warn(
                "login refused: bad credentials for {who} from {address}",
                who=f"uid={record[0]}" if record is not None else "an unknown name",
                address=address,
            )
            raise LoginRefused(*BAD_CREDENTIALS)
        assert record is not None
        uid, _, disabled = record
        if disabled:
            raise LoginRefused(*DISABLED)
        return uid
