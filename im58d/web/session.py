"""``POST /v1/login``: a session as LOGIN makes it, for clients that pull first."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.server import Request

from ..logic.auth import LoginRefused
from ..routing.iplist import IPList
from .resource import HTTPError, JSONResource, b64, field, json_body, respond

REFUSALS = {401: "unauthorized", 403: "disabled", 429: "too_many_attempts"}


class LoginResource(JSONResource):
    def __init__(self, sessions: Any, iplist: IPList) -> None:
        super().__init__()
        self.sessions = sessions
        self.iplist = iplist

    def render_POST(self, request: Request) -> Deferred[bytes]:
        body = json_body(request)
        user = field(body, "user", str)
        password = field(body, "password", str)
        device = field(body, "device", str, required=False) or ""
        address = getattr(request.getClientAddress(), "host", "")
        d: Deferred[Any] = self.sessions.login(user, password, device, None, address)
        return d.addCallbacks(self._welcome, self._refused, callbackArgs=(request,))

    def _welcome(self, result: Any, request: Request) -> bytes:
        session, inbox_max = result
        welcome = self.sessions.welcome(session, inbox_max)
        return respond(
            request,
            {
                "uid": welcome.uid,
                "session_id": b64(welcome.session_id),
                "session_key": b64(welcome.session_key),
                "token": welcome.token,
                "inbox_max": welcome.inbox_max,
                "heartbeat_s": welcome.heartbeat_s,
                "linger_s": welcome.linger_s,
                "iplist": self.iplist.as_json(),
            },
        )

    def _refused(self, failure: Failure) -> bytes:
        failure.trap(LoginRefused)
        refused = failure.value
        assert isinstance(refused, LoginRefused)
        raise HTTPError(refused.code, REFUSALS.get(refused.code, "refused"), refused.message)
