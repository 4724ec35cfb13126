"""Presence and change notices (PROTOCOL.md section 1.5).

PRESENCE goes to a user's connected friends when a session starts and when
it really ends: not when a connection drops and the session lingers, not
when a newer login replaces it.  CHANGED tells a connected user that one of
its lists has a new version, so that it pulls lazily over HTTP.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ..routing.interfaces import IRouter
from ..store.accounts import LISTS
from ..store.interfaces import IStore
from ..wire import frame
from ..wire import packets as P

log = Logger()


class Presence:
    def __init__(self, router: IRouter, store: IStore) -> None:
        self.router = router
        self.store = store

    def online(self, session: Any) -> None:
        self._tell_friends(session, True)

    def offline(self, session: Any) -> None:
        self._tell_friends(session, False)

    def _tell_friends(self, session: Any, online: bool) -> None:
        packet = frame(P.PRESENCE, (session.uid, online))
        session_for = self.router.session_for
        elsewhere = []
        for friend in session.friends:
            other = session_for(friend)
            if other is None:
                elsewhere.append((friend, 0, packet))
            elif other.connection is not None:
                other.connection.send(packet)
        if elsewhere and self.router.clustered:
            self.router.forward(elsewhere)

    def changed(self, session: Any, versions: tuple[int, ...]) -> None:
        """The session's lists have these versions now: CHANGED for each
        list that moved; the friends to tell of presence follow the list."""
        old, session.versions = session.versions, versions
        for what, before, now in zip(LISTS, old, versions, strict=True):
            if now != before and session.connection is not None:
                session.connection.send(frame(P.CHANGED, (what, now)))
        if versions[0] != old[0]:
            d = self.store.friends_of(session.uid)
            d.addCallback(lambda friends: setattr(session, "friends", frozenset(friends)))
            d.addErrback(lambda f: log.failure("reading friends of {uid}", f, uid=session.uid))

    def check_lists(self) -> Deferred[None]:
        """Compare every session's list versions with the store's
        (housekeeping): lists changed elsewhere, by im58d-admin for one,
        reach the connected users as CHANGED within a round."""
        return self._compare({session.uid: session for session in self.router.sessions()})

    def lists_moved(self, uids: list[int], forward: bool = True) -> Deferred[None]:
        """These users' lists changed through this daemon: CHANGED now (the
        users on other nodes get it from theirs, unless ``forward`` is off:
        the notice came from another node)."""
        session_for = self.router.session_for
        sessions = {uid: s for uid in uids if (s := session_for(uid)) is not None}
        if forward and len(sessions) < len(uids) and self.router.clustered:
            self.router.forward_lists([uid for uid in uids if uid not in sessions])
        return self._compare(sessions)

    def _compare(self, sessions: dict[int, Any]) -> Deferred[None]:
        if not sessions:
            return succeed(None)
        d = self.store.list_versions(list(sessions))

        def compare(current: dict[int, tuple[int, ...]]) -> None:
            for uid, versions in current.items():
                session = sessions[uid]
                if not session.ended and versions != session.versions:
                    self.changed(session, versions)

        return d.addCallback(compare)
