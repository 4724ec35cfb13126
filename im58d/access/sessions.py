"""Starting, carrying and ending sessions (PROTOCOL.md section 1.3)."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..logic.auth import Authenticator
from ..logic.interfaces import IConnection
from ..routing.interfaces import IRouter
from ..store.interfaces import IStore
from ..wire import packets as P
from .session import Session

log = Logger()

MAX_DEVICE_CHARS = 128


class SessionManager:
    """Makes sessions on login, keeps them through drops, ends them.

    A session is in the router from WELCOME to its end.  Its connection may
    come and go: while it has none, it lingers for ``linger`` seconds, then
    ends as if BYE had come.
    """

    def __init__(
        self,
        router: IRouter,
        store: IStore,
        auth: Authenticator,
        clock: IReactorTime,
        heartbeat: int = 240,
        linger: int = 300,
        iplist_version: Callable[[], int] = lambda: 0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.router = router
        self.store = store
        self.auth = auth
        self.clock = clock
        self.heartbeat = heartbeat
        self.linger = linger
        self.iplist_version = iplist_version
        self._random = random

    @inlineCallbacks
    def login(
        self,
        user: str,
        password: str,
        device: str,
        client: str | None,
        address: str,
        connection: IConnection | None = None,
        connected: Callable[[], bool] = lambda: True,
    ) -> Any:
        """Check the credentials and start a session: ``(session, inbox_max)``.

        Fails with ``LoginRefused``.  When ``connected()`` turns false while
        the credentials are checked, no session is made and None is returned.
        """
        uid = yield self.auth.authenticate(user, password, address)
        # Read the inbox head only now: what is committed after this read
        # has a higher seq and is pushed live, since the router knows the
        # session from here on (store results arrive in submission order).
        inbox_max = yield self.store.inbox_max(uid)
        if not connected():
            return None
        session = Session(
            uid,
            self._random(16),
            self._random(32),
            base64.urlsafe_b64encode(self._random(24)).decode("ascii"),
            device[:MAX_DEVICE_CHARS],
            client,
            self.clock.seconds(),
        )
        old = self.router.attach(session)
        if old is not None:
            self._replaced(old)
        if connection is not None:
            session.connection = connection
        else:
            self._start_linger(session)
        log.info(
            "login uid={uid} device={device!r} from {address}",
            uid=uid,
            device=session.device,
            address=address,
        )
        return session, inbox_max

    def welcome(self, session: Session, inbox_max: int) -> P.Welcome:
        return P.Welcome(
            session.uid,
            session.session_id,
            session.session_key,
            session.token,
            inbox_max,
            self.heartbeat,
            self.linger,
            self.iplist_version(),
        )

    def _replaced(self, old: Session) -> None:
        """A newer login took the user's session: the old one ends quietly."""
        old.ended = True
        old.unacked = None
        self._stop_linger(old)
        connection, old.connection = old.connection, None
        if connection is not None:
            connection.kick(P.KICKED_REPLACED)

    def connection_lost(self, session: Session, connection: IConnection) -> None:
        """The session's connection dropped without BYE: the session lingers."""
        if session.ended or session.connection is not connection:
            return
        session.connection = None
        # what was not acked is in the inbox: the client pulls it after
        # its next WELCOME or RESUMED
        session.unacked = None
        self._start_linger(session)

    def _start_linger(self, session: Session) -> None:
        self._stop_linger(session)
        session.linger = self.clock.callLater(self.linger, self._linger_expired, session)

    def _stop_linger(self, session: Session) -> None:
        if session.linger is not None:
            if session.linger.active():
                session.linger.cancel()
            session.linger = None

    def _linger_expired(self, session: Session) -> None:
        session.linger = None
        log.info("session of uid={uid} expired", uid=session.uid)
        self.end(session)

    def end_disabled(self) -> Deferred[None]:
        """End the sessions of users disabled meanwhile (housekeeping): an
        account disabled with im58d-admin is logged out within one round."""
        return self.store.disabled_users().addCallback(self._end_disabled)

    def _end_disabled(self, uids: list[int]) -> None:
        for uid in uids:
            session = self.router.session_for(uid)
            if session is None:
                continue
            connection = session.connection
            self.end(session)
            if connection is not None:
                connection.kick(P.KICKED_DISABLED)
            log.info("session of uid={uid} ended: account disabled", uid=uid)

    def end(self, session: Session) -> None:
        """BYE, linger expiry or a disabled account: the session is over."""
        if session.ended:
            return
        session.ended = True
        self._stop_linger(session)
        self.router.detach(session)
        session.connection = None
        session.unacked = None
