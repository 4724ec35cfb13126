"""What every HTTP resource of im58d shares: JSON bodies, JSON errors, ETags."""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, GzipEncoderFactory, Request

from ..logging import scrub_url

log = Logger()

JSON = b"application/json"


class HTTPError(Exception):
    """Answered as ``{"error": {"code": word, "message": text}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_GZIP = GzipEncoderFactory()
_GZIP.compressLevel = 6  # level 9 costs much more CPU for a few bytes
GZIP_FROM = 256


def respond(request: Request, value: Any, status: int = 200) -> bytes:
    """A JSON body, gzip-compressed when the client accepts it."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    request.setHeader(b"cache-control", b"no-store")
    body = dumps(value)
    # What EncodingResourceWrapper does, but for every JSON body of the tree
    # big enough to gain from it, and never for bodiless answers (a 304 must
    # stay empty): below GZIP_FROM bytes the gzip header and the chunked
    # framing cost more than compression saves.
    if len(body) >= GZIP_FROM:
        encoder = _GZIP.encoderForRequest(request)
        if encoder is not None:
            request._encoder = encoder
    return body


def error_body(request: Request, error: HTTPError) -> bytes:
    return respond(
        request, {"error": {"code": error.code, "message": error.message}}, error.status
    )


def not_modified(request: Request, version: int | str) -> bool:
    """Set ``ETag`` to the version; True (and 304) when the client has it."""
    tag = f'"{version}"'
    request.setHeader(b"etag", tag.encode("ascii"))
    header = request.getHeader(b"if-none-match")
    if header is None:
        return False
    for candidate in header.decode("latin-1").split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate in (tag, "*"):
            request.setResponseCode(http.NOT_MODIFIED)
            return True
    return False


class JSONResource(Resource):
    """A leaf whose ``render_<METHOD>`` may raise ``HTTPError``.

    Methods without a handler get 405; errors are JSON, never HTML.
    """

    isLeaf = True

    def render(self, request: Request) -> Any:
        try:
            handler, args = self.handler_for(request)
            result = handler(request, *args)
        except HTTPError as e:
            return error_body(request, e)
        except Exception:
            return _error_or_500(Failure(), request)
        if isinstance(result, Deferred):
            result.addErrback(_error_or_500, request)
            result.addCallback(_finish, request)
            return NOT_DONE_YET
        return result

    def handler_for(self, request: Request) -> tuple[Any, tuple[Any, ...]]:
        """The bound ``render_<METHOD>`` for the request, and its arguments
        from the path; HTTPError 404 or 405."""
        if request.postpath and any(request.postpath):
            raise _not_found(request)
        return self._method(request, self, "render"), ()

    @staticmethod
    def _method(request: Request, target: Any, prefix: str) -> Any:
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        handler = getattr(target, f"{prefix}_{method}", None)
        if handler is None:
            n = len(prefix) + 1
            allowed = sorted(
                name[n:] for name in dir(target)
                if name.startswith(prefix + "_") and name[n:].isupper()
            )
            if "GET" in allowed:
                allowed = sorted({*allowed, "HEAD"})
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            raise HTTPError(405, "method_not_allowed", f"{method} is not allowed here")
        return handler


def _not_found(request: Request) -> HTTPError:
    path = request.path.decode("utf-8", "replace")
    return HTTPError(404, "not_found", f"no resource at {path}")


class Routed(JSONResource):
    """A leaf that serves a few paths below itself: ``routes`` maps a pattern
    (a tuple of literal segments, ``int`` for an id and ``str`` for any
    other segment) to a handler prefix; the prefix's ``<prefix>_<METHOD>``
    methods get the ids and segments as arguments."""

    routes: tuple[tuple[tuple[Any, ...], str], ...] = ()

    def handler_for(self, request: Request) -> tuple[Any, tuple[Any, ...]]:
        path = [segment.decode("utf-8", "replace") for segment in request.postpath or []]
        if path and path[-1] == "":
            path.pop()  # a trailing slash
        for pattern, prefix in self.routes:
            if len(pattern) != len(path):
                continue
            args: list[Any] = []
            for want, segment in zip(pattern, path, strict=True):
                if want is int:
                    if not (segment.isascii() and segment.isdigit()) or len(segment) > 18:
                        break
                    args.append(int(segment))
                elif want is str:
                    if not segment:
                        break
                    args.append(segment)
                elif want != segment:
                    break
            else:
                return self._method(request, self, prefix), tuple(args)
        raise _not_found(request)


def _error_or_500(failure: Failure, request: Request) -> bytes:
    if isinstance(failure.value, HTTPError):
        return error_body(request, failure.value)
    # scrubbed: a raw client may put a token in the path's #fragment
    log.failure("{method} {path}", failure, method=request.method,
                path=scrub_url(request.path or b""))
    return error_body(request, HTTPError(500, "internal", "server error"))


def _finish(body: bytes, request: Request) -> None:
    if request.finished or request.channel is None:  # the client went away
        return
    if body:
        request.write(body)
    request.finish()


MAX_BODY = 64 * 1024
MAX_REQUEST = 1024 * 1024


def b64(data: bytes) -> str:
    """base64url without padding, as the contract writes binary fields."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def json_body(request: Request, max_bytes: int = MAX_BODY) -> dict[str, Any]:
    """The request's JSON object; 413 when too large, 400 when not an object."""
    content = request.content
    data = content.read(max_bytes + 1) if content is not None else b""
    if len(data) > max_bytes:
        raise HTTPError(413, "too_large", f"request body over {max_bytes} bytes")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise HTTPError(400, "bad_request", "the body is not JSON (or nests too deep)") from None
    if not isinstance(value, dict):
        raise HTTPError(400, "bad_request", "the body must be a JSON object")
    return value


def field(body: dict[str, Any], name: str, kind: type, required: bool = True) -> Any:
    """``body[name]`` checked to be a ``kind``; 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        if required:
            raise HTTPError(400, "bad_request", f"field {name!r} is missing")
        return None
    if kind is int:
        ok = type(value) is int and 0 <= value < 1 << 63
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise HTTPError(400, "bad_request", f"field {name!r} must be {_KINDS[kind]}")
    return value


_KINDS = {str: "a string", int: "a whole number", list: "a list", dict: "an object",
          bool: "true or false"}


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query argument in ``low..high``; 400 naming it otherwise."""
    values = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise HTTPError(400, "bad_request", f"{name} must be a whole number in {low}..{high}")
    return value


class AuthResource(JSONResource):
    """A resource for a signed-in device: ``Authorization: Bearer <token>``.

    The token is looked up first (in memory for a device online here, else
    in the store: sessions outlive connections); handlers get the session's
    device from ``self.session(request)``.
    """

    def __init__(self, sessions: Any) -> None:
        super().__init__()
        self.sessions = sessions

    def render(self, request: Request) -> Any:
        try:
            # a path or method this resource does not serve is a 404 or 405
            # whoever asks, before the token is looked up
            self.handler_for(request)
        except HTTPError as e:
            return error_body(request, e)
        token = _bearer(request)
        if not token:
            return error_body(request, _unauthorized(request))
        d = self.sessions.authenticate(token)
        d.addCallback(self._render_for, request)
        d.addErrback(_error_or_500, request)
        d.addCallback(lambda body: None if body is None else _finish(body, request))
        return NOT_DONE_YET

    def _render_for(self, device: Any, request: Request) -> bytes | None:
        if device is None:
            raise _unauthorized(request)
        request.im58d_device = device  # type: ignore[attr-defined]
        result = super().render(request)
        if result is NOT_DONE_YET:
            return None  # the handler's Deferred finishes the request
        body: bytes = result
        return body

    def session(self, request: Request) -> Any:
        """The device whose session token the request carries."""
        return request.im58d_device  # type: ignore[attr-defined]


def _unauthorized(request: Request) -> HTTPError:
    request.setHeader(b"www-authenticate", b"Bearer")
    return HTTPError(401, "unauthorized", "sign in first (Authorization: Bearer TOKEN)")


def _bearer(request: Request) -> str:
    header = request.getHeader(b"authorization") or b""
    scheme, _, token = header.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class AdminResource(JSONResource):
    """A resource for operators: ``Authorization: Bearer <[admin] token>``.

    Off (403) while the config has no admin token; 401 without a bearer
    token, 403 with a wrong one.  ``local_ok``: requests from a loopback
    address need no token (``/metrics`` for a scraper on the same host).
    """

    local_ok = False

    def __init__(self, admin_token: str) -> None:
        super().__init__()
        self.admin_token = admin_token

    def check_admin(self, request: Request) -> None:
        if self.local_ok and _is_loopback(request):
            return
        if not self.admin_token:
            raise HTTPError(403, "forbidden", "admin endpoints are off: set [admin] token")
        token = _bearer(request)
        if not token:
            request.setHeader(b"www-authenticate", b"Bearer")
            raise HTTPError(401, "unauthorized", "Authorization: Bearer ADMIN_TOKEN needed")
        if not hmac.compare_digest(token.encode(), self.admin_token.encode()):
            raise HTTPError(403, "forbidden", "wrong admin token")

    def handler_for(self, request: Request) -> tuple[Any, tuple[Any, ...]]:
        self.check_admin(request)
        return super().handler_for(request)


def _is_loopback(request: Request) -> bool:
    host = getattr(request.getClientAddress(), "host", "")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BoundedRequest(Request):
    """A request whose body may not exceed MAX_REQUEST bytes: past that the
    connection is dropped while the body is still coming, before it fills
    memory or disk (bodies past MAX_BODY get a JSON 413 from the resource)."""

    received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_REQUEST:
            self.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        super().handleContentChunk(data)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # "Server: TwistedWeb/x.y" is 28 bytes on every answer, and news
            # for whoever scans for versions
            self.responseHeaders.removeHeader(b"server")
        super().write(data)


class NotFound(JSONResource):
    def render(self, request: Request) -> bytes:
        return error_body(request, _not_found(request))


class Directory(Resource):
    """A node of the tree whose unknown children are JSON 404s."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)
