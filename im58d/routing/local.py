"""The in-process router: a few dicts, for a daemon that runs as one node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from .interfaces import IRouter


@implementer(IRouter)
class LocalRouter:
    clustered = False

    def __init__(self) -> None:
        self._by_uid: dict[int, Any] = {}
        self._by_id: dict[bytes, Any] = {}
        self._by_token: dict[str, Any] = {}

    def attach(self, session: Any) -> Any:
        old = self._by_uid.get(session.uid)
        if old is not None:
            self._forget(old)
        self._by_uid[session.uid] = session
        self._by_id[session.session_id] = session
        self._by_token[session.token] = session
        return old

    def _forget(self, session: Any) -> None:
        del self._by_uid[session.uid]
        self._by_id.pop(session.session_id, None)
        self._by_token.pop(session.token, None)

    def detach(self, session: Any) -> bool:
        if self._by_uid.get(session.uid) is not session:
            return False
        self._forget(session)
        return True

    def session_for(self, uid: int) -> Any:
        return self._by_uid.get(uid)

    def session_by_id(self, session_id: bytes) -> Any:
        return self._by_id.get(session_id)

    def session_by_token(self, token: str) -> Any:
        return self._by_token.get(token)

    def sessions(self) -> Iterator[Any]:
        return iter(list(self._by_uid.values()))

    def __len__(self) -> int:
        return len(self._by_uid)

    # one node: this node's dicts are the deployment's

    def register(self, session: Any) -> Deferred[bool]:
        return succeed(False)

    def fetch(self, session_id: bytes) -> Deferred[dict[str, Any] | None]:
        return succeed(None)

    def take(self, session: Any) -> Deferred[bool]:
        return succeed(False)

    def use_nonce(self, session_id: bytes, nonce: bytes) -> Deferred[bool]:
        return succeed(True)

    def release(self, session: Any, was_current: bool, connected: bool = False) -> Deferred[bool]:
        return succeed(was_current)

    def token_uid(self, token: str) -> Deferred[int | None]:
        return succeed(None)

    def forward(self, packets: list[tuple[int, int, bytes]]) -> None:
        pass

    def forward_lists(self, uids: list[int]) -> None:
        pass
