"""Devices, their sessions and their connections (PROTOCOL.md section 1.3).

A session is a device's sign-in.  Its record is in the store, so it
outlives connections, BYE and the daemon itself; this module keeps a copy of
every session whose device is online on this node (connected, or lingering
for ``linger`` seconds after its connection dropped), in the router.

A device's states::

    offline ──LOGIN/RESUME──▶ attached ──drop──▶ lingering ──expiry──▶ offline
                                 ▲  │                │
                                 │  └─────BYE────────┼───────────────▶ offline
                                 └──────RESUME───────┘
    any state ──sign-out, newer LOGIN, eviction, disabled, expiry──▶ ended

A user is online while any of their devices is; presence changes only when
the first device comes online and when the last one goes offline.
"""

from __future__ import annotations

import base64
import hmac
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..proof import resume_mac
from ..routing.interfaces import IRouter
from ..store.interfaces import IStore
from . import packets as P
from .auth import Authenticator
from .interfaces import IConnection, ISessions
from .presence import Presence

log = Logger()

MAX_DEVICE_NAME = 128
# seconds a RESUME's ts may be off the server's clock
RESUME_WINDOW = 300
DAY = 86400


class ResumeRefused(Exception):
    """The RESUME cannot be accepted (answered with ERROR 409)."""


class User:
    """A user with devices online on this node."""

    __slots__ = ("uid", "devices", "friends", "versions", "__weakref__")

    def __init__(self, uid: int) -> None:
        self.uid = uid
        # session_id -> Device, for the devices online here
        self.devices: dict[bytes, Device] = {}
        # whom to tell of presence, and the list versions the devices know of
        self.friends: frozenset[int] = frozenset()
        self.versions: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"<User {self.uid}: {len(self.devices)} devices here>"


class Device:
    """A device's session, as this node holds it."""

    __slots__ = (
        "uid",
        "user",
        "session_id",
        "key",
        "token",
        "device",
        "device_id",
        "name",
        "client",
        "nonce",
        "connection",
        "linger",
        "ended",
        "unacked",
        "pull_max",
        "acked_max",
        "cursor",
        "gen",
        "resuming",
        "__weakref__",
    )

    def __init__(
        self,
        uid: int,
        session_id: bytes,
        key: bytes,
        token: str,
        device: int,
        device_id: bytes,
        name: str,
        client: str | None,
        nonce: bytes = bytes(8),
    ) -> None:
        self.uid = uid
        self.user: User | None = None  # set while online here
        self.session_id = session_id
        self.key = key
        self.token = token
        self.device = device  # the store's key of the device
        self.device_id = device_id
        self.name = name
        self.client = client
        # the greatest RESUME nonce accepted
        self.nonce = nonce
        self.connection: IConnection | None = None
        # the DelayedCall that takes the device offline while it lingers
        self.linger: Any = None
        self.ended = False
        # MSG_Ns sent on the current connection and not acked yet:
        # (seq, packet, sent at), oldest first; None when there are none
        self.unacked: deque[tuple[int, Any, float]] | None = None
        # the inbox_max of the last WELCOME or RESUMED: the device pulls up
        # to it, pushes come above it
        self.pull_max = 0
        # the highest seq the device acked (it may not be committed yet), and
        # its cursor as the store has it
        self.acked_max = 0
        self.cursor = 0
        # how often the session moved between nodes (several nodes only)
        self.gen = 0
        # a RESUME of it is being checked: its linger waits for the answer
        self.resuming = False

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Device:
        device = cls(
            record["uid"], record["session_id"], record["key"], record["token"],
            record["device"], record["device_id"], record["name"], record["client"],
            record["nonce"],
        )
        device.acked_max = device.cursor = record.get("acked", 0)
        device.gen = record.get("gen", 0)
        return device

    @property
    def online(self) -> bool:
        return self.user is not None

    def __repr__(self) -> str:
        state = ("ended" if self.ended else "attached" if self.connection
                 else "lingering" if self.user else "offline")
        return f"<Device uid={self.uid} {self.name!r} {state}>"


@implementer(ISessions)
class SessionManager:
    """Signs devices in, carries their sessions across connections, ends them."""

    def __init__(
        self,
        router: IRouter,
        store: IStore,
        auth: Authenticator,
        clock: IReactorTime,
        presence: Presence,
        heartbeat: int = 240,
        linger: int = 300,
        max_devices: int = 5,
        expire_days: int = 90,
        iplist_version: Callable[[], int] = lambda: 0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.router = router
        self.store = store
        self.auth = auth
        self.clock = clock
        self.presence = presence
        self.heartbeat = heartbeat
        self.linger = linger
        self.max_devices = max_devices
        self.expire_days = expire_days
        self.iplist_version = iplist_version
        self._random = random

    def now(self) -> int:
        return int(self.clock.seconds())

    # signing in

    @inlineCallbacks
    def login(
        self,
        user: str,
        password: str,
        device_id: bytes,
        device_name: str,
        address: str,
        client: str | None = None,
        connection: IConnection | None = None,
        connected: Callable[[], bool] = lambda: True,
    ) -> Any:
        """Check the credentials and sign the device in: ``(device,
        Welcome)``.  With a connection the device comes online on it;
        without (``POST /v1/login``) it stays offline until it resumes.

        Fails with ``LoginRefused``.  When ``connected()`` turns false while
        the credentials are checked, no session is made and None is returned.
        """
        uid = yield self.auth.authenticate(user, password, address)
        if connection is not None and not connected():
            return None
        name = device_name[:MAX_DEVICE_NAME]
        client = client[:MAX_DEVICE_NAME] if client else None
        session_id, key = self._random(16), self._random(32)
        token = base64.urlsafe_b64encode(self._random(24)).decode("ascii")
        state = yield self.store.sign_in(
            uid, device_id, name, client, session_id, key, token, self.now(),
            self.max_devices, connection is not None,
        )
        # Online at once, before anything else runs: what is committed after
        # the store read the timeline head has a higher seq and is pushed
        # live (store results arrive in submission order).  WELCOME goes
        # first, then whatever the device is told.
        device = Device(uid, session_id, key, token, state["device"], device_id, name, client)
        device.pull_max = state["inbox_max"]
        device.acked_max = device.cursor = state["acked"]
        welcome = P.Welcome(
            uid, session_id, key, token, state["inbox_max"], self.heartbeat, self.linger,
            self.iplist_version(), state["last_cmid"], state["acked"],
        )
        live = connection is not None and connected()
        if connection is not None:
            if live:
                connection.send(welcome)
            # a connection that went meanwhile leaves the device lingering:
            # it is online in the store
            self._come_online(device, state, connection if live else None)
        ended = [(state["replaced"], P.REPLACED)] if state["replaced"] else []
        ended += [(sid, P.SIGNED_OUT) for sid in state["evicted"]]
        for sid, reason in ended:
            self._end_here_or_elsewhere(sid, reason)
        # the device list moved: CHANGED to the user's other devices still
        # signed in (the new one knows from WELCOME)
        user = self.router.user(uid)
        if user is not None:
            self.presence.changed(user, tuple(state["versions"]), skip=device)
        if self.router.clustered:
            self.router.forward_lists([uid])
        log.info(
            "login uid={uid} device={device!r} from {address}",
            uid=uid, device=name, address=address,
        )
        if connection is not None and not live:
            return None
        return device, welcome

    @inlineCallbacks
    def resume(
        self,
        session_id: bytes,
        ts: int,
        nonce: bytes,
        mac: bytes,
        connection: IConnection,
        connected: Callable[[], bool] = lambda: True,
    ) -> Any:
        """Carry a session on over a new connection: ``(device, Resumed)``.

        The device proves it holds the session key and sends a nonce greater
        than any before, which is recorded durably before the answer.  Fails
        with ``ResumeRefused``; None when the connection went away meanwhile.
        """
        now = self.now()
        held = self.router.device_by_id(session_id)
        record = None
        if held is not None and not held.ended:
            key = held.key
        else:
            record = yield self.store.session(session_id)
            if record is None:
                raise ResumeRefused("no such session")
            key = record["key"]
        if abs(now - ts) > RESUME_WINDOW:
            raise ResumeRefused("ts too far from the server's clock")
        if not hmac.compare_digest(resume_mac(key, session_id, ts, nonce), mac):
            raise ResumeRefused("bad proof")
        if held is not None and nonce <= held.nonce:
            raise ResumeRefused("nonce not greater than the last one")
        if held is not None:
            held.resuming = True
        try:
            state = yield self.store.resume(session_id, nonce, now)
        finally:
            if held is not None:
                held.resuming = False
        if state is None:
            raise ResumeRefused("nonce not greater than the last one, or the session ended")
        # the copy held here, if any (it may have come or gone meanwhile),
        # else the record made into one
        device = self.router.device_by_id(session_id) or held
        if device is None:
            assert record is not None
            device = Device.from_record(record)
        if device.ended:
            raise ResumeRefused("the session ended")
        device.nonce = max(device.nonce, nonce)
        device.pull_max = state["inbox_max"]
        device.acked_max = max(device.acked_max, state["acked"])
        device.cursor = state["acked"]
        resumed = P.Resumed(device.uid, state["inbox_max"], self.iplist_version(), state["acked"])
        live = connected()
        if live:
            connection.send(resumed)
        self._come_online(device, state, connection if live else None)
        if not live:
            return None
        return device, resumed

    def _come_online(
        self, device: Device, state: dict[str, Any], connection: IConnection | None
    ) -> None:
        """The device is online here from now on, on ``connection`` (None:
        lingering).  The first device of the user brings the user online."""
        if device.user is None:
            user = self.router.user(device.uid)
            if user is None:
                user = User(device.uid)
                user.friends = frozenset(state["friends"])
                user.versions = tuple(state["versions"])
            device.user = user
            first = self.router.attach(device)
            self.attach(device, connection)
            d = self.router.register(device, first)
            d.addCallback(self._registered, device)
            d.addErrback(lambda f: log.failure("recording a device online", f))
        else:
            self.attach(device, connection)

    def _registered(self, answer: tuple[bool, bool], device: Device) -> None:
        first, fresh = answer
        if device.ended or device.user is None:
            return
        if first:
            self.presence.online(device.user)
        if fresh and device.connection is not None:
            self.presence.tell_online(device)

    def attach(self, device: Device, connection: IConnection | None) -> None:
        """The device's connection is ``connection`` from now on (None: it
        lingers).  A connection still attached (the device came back before
        the server noticed the drop, or a second client uses the same
        device's session) gets KICKED 1 and is closed."""
        old = device.connection
        device.connection = connection
        device.unacked = None
        self._stop_linger(device)
        if old is not None and old is not connection:
            old.send(P.Kicked(P.REPLACED))
            old.close()
        if connection is None:
            self._start_linger(device)

    # going offline

    def connection_lost(self, device: Device, connection: IConnection) -> None:
        """The device's connection dropped without BYE: it lingers."""
        if device.ended or device.connection is not connection:
            return
        device.connection = None
        # what was not acked is in the timeline: the device pulls it after
        # its next RESUMED
        device.unacked = None
        self._start_linger(device)

    def bye(self, device: Device) -> None:
        """BYE: the device is offline at once; its session stays."""
        self._go_offline(device)

    def _start_linger(self, device: Device) -> None:
        self._stop_linger(device)
        device.linger = self.clock.callLater(self.linger, self._linger_expired, device)

    def _stop_linger(self, device: Device) -> None:
        if device.linger is not None:
            if device.linger.active():
                device.linger.cancel()
            device.linger = None

    def _linger_expired(self, device: Device) -> None:
        if device.resuming:
            # the store has the device online again unless the RESUME fails:
            # look again in a moment rather than mark it offline under it
            device.linger = self.clock.callLater(1, self._linger_expired, device)
            return
        device.linger = None
        log.info("device of uid={uid} went offline (linger expired)", uid=device.uid)
        self._go_offline(device)

    def _go_offline(self, device: Device) -> None:
        if device.ended or device.user is None:
            return
        connection = device.connection
        self._leave(device, offline=True)
        if connection is not None:
            connection.close()

    def _leave(self, device: Device, offline: bool = False) -> None:
        """The device is no longer online here (``offline``: nor anywhere,
        for the store, unless another node took it meanwhile); the last
        device of the user takes the user offline (the registry decides,
        with several nodes)."""
        self._stop_linger(device)
        connected = device.connection is not None
        device.connection = None
        device.unacked = None
        user = device.user
        if user is None:
            return
        device.user = None
        last = self.router.detach(device)
        d = self.router.release(device, last, connected)
        d.addCallback(self._released, user, device, offline)
        d.addErrback(lambda f: log.failure("recording a device offline", f))

    def _released(self, answer: tuple[bool, bool], user: User, device: Device,
                  offline: bool) -> None:
        here, last = answer
        if offline and here:
            d = self.store.set_offline([device.session_id], self.now())
            d.addErrback(lambda f: log.failure("recording a device offline", f))
        # the answer may come after Redis is back, when a device of the
        # user may be online here again
        if last and not user.devices and self.router.user(user.uid) is None:
            self.presence.offline(user)

    # ending sessions

    def end(self, device: Device, reason: int) -> None:
        """The session is over (signed out, replaced, evicted, disabled,
        expired): KICKED ``reason`` on its connection, and it is offline."""
        if device.ended:
            return
        device.ended = True
        connection = device.connection
        self._leave(device)
        if connection is not None:
            connection.send(P.Kicked(reason))
            connection.close()

    def end_here(self, session_id: bytes, reason: int) -> bool:
        """End the session if its device is online here; whether it was."""
        device = self.router.device_by_id(session_id)
        if device is None:
            return False
        self.end(device, reason)
        return True

    def gone(self, session_id: bytes, gen: int | None) -> None:
        """The device's client resumed on another node, which took the
        device (several nodes): the copy here goes quietly, the friends see
        nothing.  A connection still attached here belongs to a second
        client of the same session: KICKED 1."""
        device = self.router.device_by_id(session_id)
        if device is None or device.ended:
            return
        if gen is not None and device.gen >= gen:
            return  # an old notice: the device came back here since
        connection = device.connection
        self._stop_linger(device)
        device.connection = None
        device.unacked = None
        device.user = None
        self.router.detach(device)
        if connection is not None:
            connection.send(P.Kicked(P.REPLACED))
            connection.close()

    def _end_here_or_elsewhere(self, session_id: bytes, reason: int) -> None:
        if not self.end_here(session_id, reason) and self.router.clustered:
            self.router.end_elsewhere([session_id], reason)

    def end_disabled(self) -> Deferred[None]:
        """End the sessions of accounts disabled meanwhile (housekeeping):
        an account disabled with im58d-admin is signed out everywhere
        within a round, its devices get KICKED 4."""
        return self.store.disabled_users().addCallback(self._end_disabled)

    def _end_disabled(self, uids: list[int]) -> None:
        for uid in uids:
            user = self.router.user(uid)
            if user is None:
                continue
            for device in list(user.devices.values()):
                self.end(device, P.DISABLED)
            log.info("sessions of uid={uid} ended: account disabled", uid=uid)

    @inlineCallbacks
    def expire(self) -> Any:
        """End, in the store, the sessions of disabled accounts and those
        unused for ``expire_days`` (housekeeping)."""
        stale = yield self.store.stale_sessions(self.now() - self.expire_days * DAY)
        if not stale:
            return
        for _, session_id in stale:
            self.end_here(session_id, P.EXPIRED)
        moved = yield self.store.end_sessions([sid for _, sid in stale])
        self.presence.lists_moved(moved)
        log.info("{n} sessions ended (disabled accounts, unused {days} days)",
                 n=len(stale), days=self.expire_days)

    # restarts

    @inlineCallbacks
    def restore(self) -> Any:
        """At start: the devices that were online when the daemon stopped
        (or died) linger again, from now, so that their clients resume
        without their friends seeing them go."""
        records = yield self.store.online_sessions()
        self.adopt(records)

    def adopt(self, records: list[dict[str, Any]]) -> None:
        """Devices online elsewhere or before (a restart, a node that
        stopped) linger here; their clients resume on any node.  Records
        that carry their user's ``friends`` and ``versions`` (a restart) are
        online here at once, before any sign-in can be answered."""
        fresh = [r for r in records if self.router.device_by_id(r["session_id"]) is None]
        if not fresh:
            return
        if all("friends" in r for r in fresh):
            self._adopted({r["uid"]: r for r in fresh}, fresh)
            return
        d = self.store.user_states(sorted({r["uid"] for r in fresh}))
        d.addCallback(self._adopted, fresh)
        d.addErrback(lambda f: log.failure("adopting {n} sessions", f, n=len(fresh)))

    def _adopted(self, states: dict[int, dict[str, Any]], records: list[dict[str, Any]]
                 ) -> None:
        n = 0
        for record in records:
            if self.router.device_by_id(record["session_id"]) is None:
                self._come_online(Device.from_record(record), states[record["uid"]], None)
                n += 1
        log.info("{n} devices online before linger here ({linger} s)", n=n,
                 linger=self.linger)

    # the web layer's view

    def authenticate(self, token: str) -> Deferred[Device | None]:
        """The device of the session with this bearer token.  The store is
        asked even for a device online here: it refuses the tokens of an
        account disabled meanwhile at once, before a housekeeping round ends
        its sessions here."""

        def found(record: dict[str, Any] | None) -> Device | None:
            if record is None:
                return None
            device = self.router.device_by_token(token)
            if device is not None and not device.ended:
                return device  # type: ignore[no-any-return]
            return Device.from_record(record)

        return self.store.session_by_token(token).addCallback(found)

    def devices(self, device: Device) -> Deferred[tuple[int, list[dict[str, Any]]]]:
        """The user's signed-in devices; a device online now was last seen now."""

        def mark(result: tuple[int, list[dict[str, Any]]]) -> tuple[int, list[dict[str, Any]]]:
            now = self.now()
            for entry in result[1]:
                entry["current"] = entry["session_id"] == device.session_id
                if entry["online"]:
                    entry["last_seen"] = now
            return result

        return self.store.devices(device.uid).addCallback(mark)

    @inlineCallbacks
    def sign_out(self, device: Device, device_id: bytes | None) -> Any:
        """``DELETE /v1/devices/<id>`` (None: ``current``)."""
        if device_id is None:
            ended = yield self.store.sign_out(device.uid, None, device.session_id)
        else:
            ended = yield self.store.sign_out(device.uid, device_id, None)
        if ended is None:
            return False
        self._end_here_or_elsewhere(ended, P.SIGNED_OUT)
        self.presence.lists_moved([device.uid])
        return True

    def lists_moved(self, uids: list[int]) -> Deferred[None]:
        return self.presence.lists_moved(uids)
