"""The list of access servers that clients connect to by address.

Its version is derived from its content, so every node configured with the
same list gives the same version, and any change gives a new one.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from typing import Any

from ..endpoints import parse


@dataclass(frozen=True)
class AccessServer:
    host: str
    port: int
    tls: bool = False
    weight: int = 1


def parse_server(text: str) -> AccessServer:
    """``HOST:PORT [tls] [weight=N]``, as written in the config file."""
    words = text.split()
    if not words:
        raise ValueError("empty server entry")
    host, sep, port = words[0].rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{words[0]!r} is not HOST:PORT")
    tls = False
    weight = 1
    for word in words[1:]:
        if word == "tls":
            tls = True
        elif word.startswith("weight=") and word[7:].isdigit() and int(word[7:]) > 0:
            weight = int(word[7:])
        else:
            raise ValueError(f"unknown server option {word!r} (tls, weight=N)")
    return AccessServer(host, int(port), tls, weight)


def server_from_endpoint(description: str) -> AccessServer | None:
    """The server a client reaches through a listener, when its address is concrete."""
    kind, args, kwargs = parse(description)
    port = args[0] if args else kwargs.get("port", "")
    interface = kwargs.get("interface", "")
    if kind not in ("tcp", "ssl") or not port.isdigit():
        return None
    if interface in ("", "0.0.0.0", "::"):
        return None
    return AccessServer(interface, int(port), kind == "ssl")


class IPList:
    def __init__(self, servers: list[AccessServer]) -> None:
        self.update(servers)

    def update(self, servers: list[AccessServer]) -> None:
        """The list is now ``servers`` (with several nodes: the live ones)."""
        self.servers = tuple(servers)
        self.body = {"servers": [asdict(s) for s in self.servers]}
        canonical = json.dumps(self.body, sort_keys=True).encode()
        self.version = zlib.crc32(canonical) & 0x7FFFFFFF

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, **self.body}
