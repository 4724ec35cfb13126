"""Signing devices in and out over HTTP: ``POST /v1/login``, ``/v1/devices``."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.server import Request

from ..logic.auth import LoginRefused
from ..routing.iplist import IPList
from .resource import (
    AuthResource,
    HTTPError,
    JSONResource,
    Routed,
    b64,
    field,
    json_body,
    not_modified,
    respond,
)

REFUSALS = {401: "unauthorized", 403: "disabled", 429: "too_many_attempts",
            503: "busy"}
DEVICE_ID_BYTES = 16


def device_id_from(text: str, name: str) -> bytes:
    """A device id written as base64url without padding; 400 naming
    ``name`` unless it is 16 bytes."""
    try:
        if not text.isascii():
            raise ValueError(text)
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        data = b""
    if len(data) != DEVICE_ID_BYTES or b64(data) != text:
        raise HTTPError(400, "bad_request",
                        f"{name} must be 16 bytes in base64url without padding")
    return data


class LoginResource(JSONResource):
    """``POST /v1/login``: a session for a device, as LOGIN makes it, for
    clients that pull first.  The device is offline until it connects and
    resumes the session."""

    def __init__(self, sessions: Any, iplist: IPList) -> None:
        super().__init__()
        self.sessions = sessions
        self.iplist = iplist

    def render_POST(self, request: Request) -> Deferred[bytes]:
        body = json_body(request)
        user = field(body, "user", str)
        password = field(body, "password", str)
        device_id = device_id_from(field(body, "device_id", str), "field 'device_id'")
        device_name = field(body, "device_name", str, required=False) or ""
        address = getattr(request.getClientAddress(), "host", "")
        d: Deferred[Any] = self.sessions.login(user, password, device_id, device_name, address)
        return d.addCallbacks(self._welcome, self._refused, callbackArgs=(request,))

    def _welcome(self, result: Any, request: Request) -> bytes:
        _, welcome = result
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
                "last_cmid": welcome.last_cmid,
                "acked": welcome.acked,
                "iplist": self.iplist.as_json(),
            },
        )

    def _refused(self, failure: Failure) -> bytes:
        failure.trap(LoginRefused)
        refused = failure.value
        assert isinstance(refused, LoginRefused)
        raise HTTPError(refused.code, REFUSALS.get(refused.code, "refused"), refused.message)


class DevicesResource(Routed, AuthResource):
    """``GET /v1/devices`` and ``DELETE /v1/devices/<device_id>|current``."""

    routes = (((), "list"), ((str,), "device"))

    def list_GET(self, request: Request) -> Deferred[bytes]:
        d: Deferred[Any] = self.sessions.devices(self.session(request))
        return d.addCallback(self._listed, request)

    @staticmethod
    def _listed(result: tuple[int, list[dict[str, Any]]], request: Request) -> bytes:
        version, devices = result
        if not_modified(request, version):
            return b""
        return respond(request, {"version": version, "devices": [
            {"id": b64(entry["device_id"]), "name": entry["name"],
             "current": entry["current"], "online": entry["online"],
             "last_seen": entry["last_seen"], "push": None}
            for entry in devices
        ]})

    def device_DELETE(self, request: Request, which: str) -> Deferred[bytes]:
        device_id = None if which == "current" else device_id_from(which, "the device id")
        d: Deferred[Any] = self.sessions.sign_out(self.session(request), device_id)
        return d.addCallback(self._signed_out, request)

    @staticmethod
    def _signed_out(ended: bool, request: Request) -> bytes:
        if not ended:
            raise HTTPError(404, "not_found", "no such device signed in")
        request.setResponseCode(204)
        return b""
