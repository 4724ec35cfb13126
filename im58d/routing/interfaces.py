"""The routing layer: which session, and so which connection, a user has."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from zope.interface import Interface


class IRouter(Interface):
    """uid -> session.  A user has at most one session."""

    def attach(session: Any) -> Any:
        """Make ``session`` the user's session; returns the one it replaced, or None."""

    def detach(session: Any) -> bool:
        """Forget ``session`` if it is still the user's; returns whether it was."""

    def session_for(uid: int) -> Any:
        """The user's session, or None."""

    def session_by_id(session_id: bytes) -> Any:
        """The session with this id, or None."""

    def session_by_token(token: str) -> Any:
        """The session with this bearer token, or None."""

    def sessions() -> Iterator[Any]:
        """Every session."""

    def __len__() -> int:
        """The number of sessions."""
