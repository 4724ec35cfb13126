"""systemd integration without libsystemd: readiness notification (``sd_notify``)
and the address of a listening socket handed over by socket activation.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, the path of a datagram
socket (``@name`` for one in the abstract namespace); the daemon sends
``READY=1`` to it once its listeners are up and ``STOPPING=1`` when it begins
to stop.  Outside systemd there is no such variable and nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


def notify_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The address of ``$NOTIFY_SOCKET`` for ``sendto``: a filesystem path, or
    ``"\\0name"`` for ``@name`` (the abstract namespace); None when unset or
    of a kind this does not speak (``vsock:``)."""
    value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1"``, newline-separated assignments) to the
    service manager; True when it was sent, False when there is no manager
    to tell or the send failed (which is logged: the daemon runs on)."""
    address = notify_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as e:
        log.warn("cannot notify systemd ({state!r}): {error}", state=state, error=e)
        return False
    return True


class NotifyService(Service):
    """Tells systemd ``READY=1`` once the reactor runs (every other service
    has started, the listeners listen) and ``STOPPING=1`` when stopping
    begins; place it last in an ordered parent, so it starts last and is
    stopped first."""

    name = "systemd-notify"

    def __init__(self, reactor: Any, send: Callable[[str], bool] = notify) -> None:
        self._reactor = reactor
        self._send = send

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if self.running and self._send("READY=1\nSTATUS=accepting connections"):
            log.info("told systemd READY=1")

    def stopService(self) -> Any:
        super().stopService()
        self._send("STOPPING=1\nSTATUS=stopping")
        return None


def inherited_address(fileno: int) -> tuple[int, Any]:
    """``(family, sockname)`` of an inherited socket, read from the socket
    itself (a duplicate of it, so the descriptor stays as it is)."""
    with socket.socket(fileno=os.dup(fileno)) as sock:
        return sock.family, sock.getsockname()
