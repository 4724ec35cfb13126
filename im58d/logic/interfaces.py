"""What the logic layer needs of the layers around it, and what it offers."""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IConnection(Interface):
    """A device's live connection, as the logic layer sees it.

    The logic layer hands it packets (``im58d.logic.packets``); the access
    layer alone encodes them, coalescing a reactor turn's packets into one
    write.
    """

    address = Attribute("The peer's address, for logs and attempt limiting.")
    congested = Attribute("True while the client leaves what is written unread.")

    def send(packet: object) -> None:
        """Queue a packet for the device."""

    def error(code: int, message: str, ref: int | None = None) -> None:
        """Queue ERROR ``code``; the connection stays open."""

    def close() -> None:
        """Send what is queued, then close (the client gets to read it)."""

    def abort() -> None:
        """Drop the connection at once (a dead or stuck peer)."""


class ISessions(Interface):
    """The logic layer as the web layer sees it: sign-in, sessions by token,
    devices, and the notices that follow a change made over HTTP."""

    def login(
        user: str, password: str, device_id: bytes, device_name: str, address: str
    ) -> object:
        """Sign a device in without a connection: a Deferred firing with
        ``(Device, Welcome)``, or failing with ``LoginRefused``."""

    def authenticate(token: str) -> object:
        """A Deferred firing with the ``Device`` of the session with this
        bearer token, or None."""

    def devices(device: Any) -> object:
        """A Deferred firing with ``(version, [device entries])``, the
        calling device marked ``current``."""

    def sign_out(device: Any, device_id: bytes | None) -> object:
        """Sign out one of the user's devices (None: the calling one); a
        Deferred firing with whether there was such a session."""

    def lists_moved(uids: list[int]) -> object:
        """These users' lists changed: CHANGED to their connected devices."""
