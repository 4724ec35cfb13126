"""The routing layer: which session, and so which connection, a user has."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class IRouter(Interface):
    """uid -> session.  A user has at most one session, in the whole deployment.

    The synchronous methods answer for this node's sessions (a dict lookup,
    on the message path).  The Deferred ones keep the deployment's view: on
    one node they answer at once from the dicts; with several nodes they ask
    the shared registry, so that a session made on one node can be resumed,
    replaced or ended on another.
    """

    clustered = Attribute("True when other nodes may hold sessions.")

    def attach(session: Any) -> Any:
        """Make ``session`` the user's session on this node; returns the one it
        replaced here, or None."""

    def detach(session: Any) -> bool:
        """Forget ``session`` if it is still the user's here; returns whether it was."""

    def session_for(uid: int) -> Any:
        """The user's session on this node, or None."""

    def session_by_id(session_id: bytes) -> Any:
        """The session with this id on this node, or None."""

    def session_by_token(token: str) -> Any:
        """The session with this bearer token on this node, or None."""

    def sessions() -> Iterator[Any]:
        """Every session of this node."""

    def __len__() -> int:
        """The number of sessions of this node."""

    def register(session: Any) -> Deferred[bool]:
        """A new session (login): record it for the deployment; fires True when
        it replaced the user's session on another node (which is told)."""

    def fetch(session_id: bytes) -> Deferred[dict[str, Any] | None]:
        """The record of a session held by another node (for RESUME): uid, key,
        token, device, client, started, gen; None when there is none."""

    def take(session: Any) -> Deferred[bool]:
        """Move a fetched session to this node; False when it ended or was
        replaced meanwhile.  The node that held it drops it quietly."""

    def use_nonce(session_id: bytes, nonce: bytes) -> Deferred[bool]:
        """Record a RESUME nonce; False when it was used before on any node."""

    def release(session: Any, was_current: bool, connected: bool = False) -> Deferred[bool]:
        """The session ended here (``connected``: its client was on this
        node, a BYE); fires whether it was still the user's session in the
        deployment (then, and only then, friends are told)."""

    def token_uid(token: str) -> Deferred[int | None]:
        """The uid of the session with this bearer token on any node."""

    def forward(packets: list[tuple[int, int, bytes]]) -> None:
        """Frames for users with no session on this node, ``(uid, seq, frame)``
        (seq 0: not a MSG_N): to the nodes that hold their sessions."""

    def forward_lists(uids: list[int]) -> None:
        """These users' lists changed: their nodes send CHANGED."""
