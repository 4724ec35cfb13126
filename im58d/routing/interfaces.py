"""The routing layer: which devices, and so which connections, a user has."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class IRouter(Interface):
    """uid -> the user's devices online on this node, and, with several
    nodes, the deployment's view of them.

    The synchronous methods answer for this node (dict lookups, on the
    message path).  The Deferred ones keep the deployment's view: on one
    node they answer at once; with several nodes they ask the shared
    registry, so that a device online on one node can resume on another, and
    presence changes exactly once for the whole deployment.

    A user is an object with ``uid`` and ``devices`` (session id -> device);
    a device has ``uid``, ``user``, ``session_id`` and ``token``.  The logic
    layer makes both; the router keeps them.
    """

    clustered = Attribute("True when other nodes may hold devices.")

    def attach(device: Any) -> bool:
        """The device (its ``user`` set) is online here; whether it is the
        user's first device here."""

    def detach(device: Any) -> bool:
        """The device is no longer online here; whether it was the user's
        last device here."""

    def user(uid: int) -> Any:
        """The user with devices online here, or None."""

    def device_by_id(session_id: bytes) -> Any:
        """The device online here with this session, or None."""

    def device_by_token(token: str) -> Any:
        """The device online here whose session has this bearer token, or None."""

    def users() -> Iterator[Any]:
        """Every user with devices online here."""

    def devices() -> Iterator[Any]:
        """Every device online here."""

    def __len__() -> int:
        """The number of devices online here."""

    def register(device: Any, first: bool) -> Deferred[tuple[bool, bool]]:
        """Record for the deployment that the device is online here (taking
        it from another node that held it, which drops its copy quietly);
        fires with whether it is the user's first device online anywhere
        (``first``: the first here), and whether the device itself was
        offline everywhere (not lingering on another node)."""

    def release(device: Any, last: bool, connected: bool) -> Deferred[tuple[bool, bool]]:
        """The device went offline here (``connected``: its client was on
        this node until now, as at a BYE); fires with whether the deployment
        had it here (not taken by another node meanwhile), and whether it was
        the user's last device online anywhere (``last``: the last here)."""

    def online_among(uids: list[int]) -> Deferred[list[int]]:
        """Those of ``uids`` with a device online anywhere."""

    def forward(items: list[tuple[int, int, Any, bytes | None]]) -> None:
        """Packets for users' devices on other nodes, ``(uid, seq, packet,
        skip)``: seq > 0 for a MSG_N, ``skip`` the session of a device that
        must not get it (its sender)."""

    def forward_lists(uids: list[int]) -> None:
        """These users' lists changed: their other nodes send CHANGED."""

    def end_elsewhere(session_ids: list[bytes], reason: int) -> None:
        """These sessions ended: the nodes where their devices are online
        send KICKED ``reason`` and take them offline."""
