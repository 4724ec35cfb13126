"""What the logic layer needs of the layers around it."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IConnection(Interface):
    """A client's live connection, as the logic layer sees it."""

    address = Attribute("The peer's address, for logs and attempt limiting.")
    congested = Attribute("True while the client leaves what is written unread.")

    def send(frame: bytes) -> None:
        """Queue an encoded frame; queued frames go out together, one write
        per connection, at the end of the reactor turn."""

    def close(code: int, message: str) -> None:
        """Send ERROR ``code`` and close."""

    def kick(reason: int) -> None:
        """Send KICKED ``reason`` and close."""

    def abort() -> None:
        """Drop the connection at once (its session lingers)."""


class ISession(Interface):
    """A user's session; it outlives the connections that carry it."""

    uid = Attribute("The user's id.")
    session_id = Attribute("16 random bytes naming the session.")
    token = Attribute("The bearer token of the session for HTTP.")
    connection = Attribute("The attached IConnection, or None while lingering.")
