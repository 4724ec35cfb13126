"""Presence, ONLINE and change notices (PROTOCOL.md section 1.5).

PRESENCE goes to a user's connected friends when the user's first device
comes online and when the last one goes offline: not when a connection drops
and the device lingers, not when a second device signs in.  ONLINE tells a
device that came online which friends are online now.  CHANGED tells a
user's connected devices that one of the user's lists has a new version, so
that they pull lazily over HTTP.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ..routing.interfaces import IRouter
from ..store.interfaces import LISTS, IStore
from . import packets as P

log = Logger()


class Presence:
    def __init__(self, router: IRouter, store: IStore) -> None:
        self.router = router
        self.store = store

    def online(self, user: Any, elsewhere_only: bool = False) -> None:
        """The user's first device came online (``elsewhere_only``: the
        friends on this node know it already)."""
        self._tell_friends(user, True, elsewhere_only)

    def offline(self, user: Any) -> None:
        """The user's last device went offline."""
        self._tell_friends(user, False)

    def _tell_friends(self, user: Any, online: bool, elsewhere_only: bool = False) -> None:
        packet = P.Presence(user.uid, online)
        find = self.router.user
        elsewhere: list[tuple[int, int, Any, bytes | None]] = []
        for friend in user.friends:
            other = None if elsewhere_only else find(friend)
            if other is not None:
                for device in other.devices.values():
                    if device.connection is not None:
                        device.connection.send(packet)
            if self.router.clustered:
                elsewhere.append((friend, 0, packet, None))
        if elsewhere:
            self.router.forward(elsewhere)

    def tell_online(self, device: Any) -> None:
        """ONLINE to a device that came online: its user's friends online now."""
        user = device.user
        if user is None:
            return
        d = self.router.online_among(sorted(user.friends))
        d.addCallback(self._told_online, device)
        d.addErrback(lambda f: log.failure("telling uid={uid} who is online", f, uid=device.uid))

    @staticmethod
    def _told_online(uids: list[int], device: Any) -> None:
        if device.connection is not None:
            device.connection.send(P.Online(tuple(uids)))

    def changed(self, user: Any, versions: tuple[int, ...], skip: Any = None) -> None:
        """The user's lists have these versions now: CHANGED to the user's
        connected devices (but ``skip``) for each list that moved; the
        friends to tell of presence follow the friend list."""
        old, user.versions = user.versions, versions
        for what, before, now in zip(LISTS, old, versions, strict=False):
            if now != before:
                packet = P.Changed(what, now)
                for device in user.devices.values():
                    if device.connection is not None and device is not skip:
                        device.connection.send(packet)
        if not old or versions[0] != old[0]:
            d = self.store.friends_of(user.uid)
            d.addCallback(lambda friends: setattr(user, "friends", frozenset(friends)))
            d.addErrback(lambda f: log.failure("reading friends of {uid}", f, uid=user.uid))

    def check_lists(self) -> Deferred[None]:
        """Compare every online user's list versions with the store's
        (housekeeping): lists changed elsewhere, by im58d-admin for one,
        reach the connected devices as CHANGED within a round."""
        return self._compare({user.uid: user for user in self.router.users()})

    def lists_moved(self, uids: list[int], forward: bool = True) -> Deferred[None]:
        """These users' lists changed through this daemon: CHANGED now (the
        devices on other nodes get it from theirs, unless ``forward`` is off:
        the notice came from another node)."""
        find = self.router.user
        users = {uid: u for uid in uids if (u := find(uid)) is not None}
        if forward and self.router.clustered and uids:
            self.router.forward_lists(list(uids))
        return self._compare(users)

    def _compare(self, users: dict[int, Any]) -> Deferred[None]:
        if not users:
            return succeed(None)
        d = self.store.list_versions(list(users))

        def compare(current: dict[int, tuple[int, ...]]) -> None:
            for uid, versions in current.items():
                user = users[uid]
                if user.devices and versions != user.versions:
                    self.changed(user, versions)

        return d.addCallback(compare)
