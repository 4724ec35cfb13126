"""Starting, carrying and ending sessions (PROTOCOL.md section 1.3)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..logic.auth import Authenticator
from ..logic.interfaces import IConnection
from ..logic.presence import Presence
from ..routing.interfaces import IRouter
from ..store.interfaces import IStore
from ..wire import packets as P
from .session import Session

log = Logger()

MAX_DEVICE_CHARS = 128
# seconds a RESUME's ts may be off the server's clock
RESUME_WINDOW = 300


class ResumeRefused(Exception):
    """The RESUME cannot be accepted (answered with ERROR 409)."""


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
        presence: Presence | None = None,
    ) -> None:
        self.router = router
        self.presence = presence
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
        state = yield self.store.session_state(uid)
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
        session.friends = frozenset(state["friends"])
        session.versions = state["versions"]
        session.pull_max = state["inbox_max"]
        # the deployment's record: a session of the user on another node
        # ends there, quietly
        replaced_elsewhere = yield self.router.register(session)
        old = self.router.attach(session)
        if old is not None:
            self._replaced(old)  # the friends see no change
        elif self.presence is not None and not replaced_elsewhere:
            self.presence.online(session)
        if connection is not None and connected():
            self.attach(session, connection)
        else:
            self._start_linger(session)
            if connection is not None:
                return None  # the connection went while it was recorded
        log.info(
            "login uid={uid} device={device!r} from {address}",
            uid=uid,
            device=session.device,
            address=address,
        )
        return session, state["inbox_max"]

    @inlineCallbacks
    def resume(
        self,
        resume: P.Resume,
        connection: IConnection,
        connected: Callable[[], bool] = lambda: True,
    ) -> Any:
        """Carry on a session over a new connection: ``(session, inbox_max)``.

        The client proves it holds the session key; the session keeps its
        uid, token and inbox, and nobody is told anything.  Fails with
        ``ResumeRefused``; None when the connection went away meanwhile.
        """
        session = self.router.session_by_id(resume.session_id)
        here = session is not None
        if session is None:
            # made or kept on another node: its record is in the registry
            record = yield self.router.fetch(resume.session_id)
            if record is not None:
                session = self._from_record(resume.session_id, record)
        now = self.clock.seconds()
        if session is None or session.ended:
            raise ResumeRefused("no such session")
        if abs(now - resume.ts) > RESUME_WINDOW:
            raise ResumeRefused("ts too far from the server's clock")
        nonces = session.nonces
        if nonces is None:
            nonces = session.nonces = {}
        else:
            for seen in [n for n, at in nonces.items() if at < now - 2 * RESUME_WINDOW]:
                del nonces[seen]
        if resume.nonce in nonces:
            raise ResumeRefused("nonce used before")
        expected = hmac.new(
            session.session_key,
            resume.session_id + resume.ts.to_bytes(8, "big") + resume.nonce,
            hashlib.sha256,
        ).digest()[:16]
        if not hmac.compare_digest(expected, resume.mac):
            raise ResumeRefused("bad proof")
        nonces[resume.nonce] = now
        fresh = yield self.router.use_nonce(resume.session_id, resume.nonce)
        if not fresh:
            raise ResumeRefused("nonce used before")
        if here:
            # as for LOGIN: what is committed after this read is pushed live
            inbox_max = yield self.store.inbox_max(session.uid)
        else:
            if not (yield self.router.take(session)):
                raise ResumeRefused("no such session")
            # here from now on, lingering until the connection is attached
            self._keep(session)
            state = yield self.store.session_state(session.uid)
            session.friends = frozenset(state["friends"])
            session.versions = state["versions"]
            inbox_max = state["inbox_max"]
        if session.ended:
            raise ResumeRefused("the session ended meanwhile")
        if not connected():
            return None
        session.pull_max = inbox_max
        self.attach(session, connection)
        return session, inbox_max

    def _from_record(self, session_id: bytes, record: dict[str, Any]) -> Session:
        session = Session(
            record["uid"],
            session_id,
            record["key"],
            record["token"],
            record["device"],
            record["client"],
            record["started"],
        )
        session.gen = record["gen"]
        return session

    def _keep(self, session: Session) -> None:
        """A session that came from another node lingers here."""
        old = self.router.attach(session)
        if old is not None and old is not session:
            self._replaced(old)  # a stale copy
        self._start_linger(session)

    def adopt(self, records: list[dict[str, Any]]) -> None:
        """Sessions of a node that stopped (or that this node kept while Redis
        was away) linger here: their clients resume on any node, and if
        they do not, the session ends here and the friends are told."""
        for record in records:
            if self.router.session_by_id(record["session_id"]) is not None:
                continue
            session = self._from_record(record["session_id"], record)
            self._keep(session)
            d = self.store.session_state(session.uid)
            d.addCallback(self._adopted, session)
            d.addErrback(lambda f: log.failure("reading an adopted session's state", f))
        log.info("{n} sessions adopted, lingering {linger} s", n=len(records),
                 linger=self.linger)

    def _adopted(self, state: dict[str, Any], session: Session) -> None:
        session.friends = frozenset(state["friends"])
        session.versions = state["versions"]

    def gone(self, session_id: bytes, gen: int | None, replaced: bool) -> None:
        """Another node took the session (RESUME there) or replaced it (a
        newer LOGIN there): it ends here without a word to the friends."""
        session = self.router.session_by_id(session_id)
        if session is None or session.ended:
            return
        if not replaced and gen is not None and session.gen >= gen:
            return  # an old notice: the session came back here since
        self.router.detach(session)
        if replaced:
            self._replaced(session)
            return
        session.ended = True
        session.unacked = None
        self._stop_linger(session)
        connection, session.connection = session.connection, None
        if connection is not None:
            connection.abort()  # the client is on the other node now

    def attach(self, session: Session, connection: IConnection) -> None:
        """The session's connection is ``connection`` from now on; one still
        attached (the client came back before it noticed the drop) is closed."""
        old = session.connection
        session.connection = connection
        session.unacked = None
        self._stop_linger(session)
        if old is not None and old is not connection:
            old.abort()

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

    def resumed(self, session: Session, inbox_max: int) -> P.Resumed:
        return P.Resumed(session.uid, inbox_max, self.iplist_version())

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
        was_current = self.router.detach(session)
        connected = session.connection is not None
        session.connection = None
        session.unacked = None
        # with several nodes, the registry decides whether it was still the
        # user's session, so that exactly one node tells the friends
        d = self.router.release(session, was_current, connected)
        if self.presence is not None:
            d.addCallback(self._ended, session)
        d.addErrback(lambda f: log.failure("ending a session", f))

    def _ended(self, was_current: bool, session: Session) -> None:
        # the answer may come after Redis is back, when a newer login of
        # the user may be here
        current = self.router.session_for(session.uid)
        if current is not None and current is not session:
            return
        if was_current and self.presence is not None:
            self.presence.offline(session)
