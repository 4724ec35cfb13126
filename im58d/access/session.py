"""The session: a user's login, apart from any TCP connection that carries it."""

from __future__ import annotations

from collections import deque
from typing import Any

from zope.interface import implementer

from ..logic.interfaces import IConnection, ISession


@implementer(ISession)
class Session:
    __slots__ = (
        "uid",
        "session_id",
        "session_key",
        "token",
        "device",
        "client",
        "started",
        "connection",
        "linger",
        "ended",
        "unacked",
        "nonces",
        "friends",
        "versions",
        "gen",
        "pull_max",
        "acked_max",
        "__weakref__",
    )

    def __init__(
        self,
        uid: int,
        session_id: bytes,
        session_key: bytes,
        token: str,
        device: str,
        client: str | None,
        started: float,
    ) -> None:
        self.uid = uid
        self.session_id = session_id
        self.session_key = session_key
        self.token = token
        self.device = device
        self.client = client
        self.started = started
        self.connection: IConnection | None = None
        # the DelayedCall that ends the session while it has no connection
        self.linger: Any = None
        self.ended = False
        # RESUME nonces seen with this session: nonce -> when (pruned after
        # the ts window); None until the first RESUME
        self.nonces: dict[bytes, float] | None = None
        # whom to tell of presence, and the list versions the client knows of
        self.friends: frozenset[int] = frozenset()
        self.versions: tuple[int, ...] = (0, 0, 0)
        # MSG_Ns sent on the current connection and not acked yet:
        # (seq, frame, sent at), oldest first; None when there are none
        self.unacked: deque[tuple[int, bytes, float]] | None = None
        # how often the session moved between nodes (several nodes only)
        self.gen = 0
        # the inbox_max of the last WELCOME or RESUMED: the client pulls up
        # to it, pushes come above it
        self.pull_max = 0
        # the highest seq the client acked (it may not be committed yet)
        self.acked_max = 0

    def __repr__(self) -> str:
        state = "ended" if self.ended else "attached" if self.connection else "lingering"
        return f"<Session uid={self.uid} {state}>"
