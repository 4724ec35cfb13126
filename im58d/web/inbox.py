"""``GET /v1/inbox`` (the timeline pull) and ``POST /v1/status`` (delivery state)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from ..store.interfaces import IStore
from .resource import AuthResource, HTTPError, b64, field, json_body, query_int, respond

MAX_STATUS_IDS = 1000


class StoreResource(AuthResource):
    """A resource for a signed-in device that reads the store."""

    def __init__(self, sessions: Any, store: IStore) -> None:
        super().__init__(sessions)
        self.store = store


class InboxResource(StoreResource):
    def render_GET(self, request: Request) -> Deferred[bytes]:
        uid = self.session(request).uid
        after = query_int(request, "after", 0, 0, (1 << 63) - 1)
        limit = query_int(request, "limit", 100, 1, 500)
        d = self.store.inbox(uid, after, limit)
        return d.addCallback(self._render, request)

    def _render(self, result: tuple[list[Any], int], request: Request) -> bytes:
        entries, inbox_max = result
        messages = []
        for seq, msg_id, sender, group, body, ts, to, delivered, _ in entries:
            entry: dict[str, Any] = {"seq": seq, "msg_id": msg_id, "from": sender}
            if to is not None:
                entry["to"] = to
            if group is not None:
                entry["group"] = group
            entry["body"] = body if type(body) is str else {"b64": b64(body)}
            entry["ts"] = ts
            if delivered is not None:
                entry["delivered"] = delivered
            messages.append(entry)
        return respond(request, {"messages": messages, "max": inbox_max})


class StatusResource(StoreResource):
    def render_POST(self, request: Request) -> Deferred[bytes]:
        uid = self.session(request).uid
        msg_ids = field(json_body(request), "msg_ids", list)
        if len(msg_ids) > MAX_STATUS_IDS:
            raise HTTPError(413, "too_large", f"at most {MAX_STATUS_IDS} msg_ids")
        if not all(type(i) is int and 0 <= i < 1 << 63 for i in msg_ids):
            raise HTTPError(400, "bad_request", "field 'msg_ids' must be whole numbers")
        d = self.store.status(uid, msg_ids)
        return d.addCallback(lambda delivered: respond(request, {"delivered": delivered}))
