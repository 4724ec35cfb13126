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
        self._users: dict[int, Any] = {}
        self._by_id: dict[bytes, Any] = {}
        self._by_token: dict[str, Any] = {}

    def attach(self, device: Any) -> bool:
        user = device.user
        first = not user.devices
        user.devices[device.session_id] = device
        self._users[user.uid] = user
        self._by_id[device.session_id] = device
        self._by_token[device.token] = device
        return first

    def detach(self, device: Any) -> bool:
        held = self._by_id.get(device.session_id)
        if held is None or held is not device:
            return False
        del self._by_id[device.session_id]
        self._by_token.pop(device.token, None)
        user = self._users.get(device.uid)
        if user is None:
            return False
        user.devices.pop(device.session_id, None)
        if user.devices:
            return False
        del self._users[device.uid]
        return True

    def user(self, uid: int) -> Any:
        return self._users.get(uid)

    def device_by_id(self, session_id: bytes) -> Any:
        return self._by_id.get(session_id)

    def device_by_token(self, token: str) -> Any:
        return self._by_token.get(token)

    def users(self) -> Iterator[Any]:
        return iter(list(self._users.values()))

    def devices(self) -> Iterator[Any]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    # one node: this node's dicts are the deployment's

    def register(self, device: Any, first: bool) -> Deferred[tuple[bool, bool]]:
        return succeed((first, True))

    def release(self, device: Any, last: bool, connected: bool) -> Deferred[tuple[bool, bool]]:
        return succeed((True, last))

    def online_among(self, uids: list[int]) -> Deferred[list[int]]:
        return succeed([uid for uid in uids if uid in self._users])

    def forward(self, items: list[tuple[int, int, Any, bytes | None]]) -> None:
        pass

    def forward_lists(self, uids: list[int]) -> None:
        pass

    def end_elsewhere(self, session_ids: list[bytes], reason: int) -> None:
        pass
