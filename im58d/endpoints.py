"""Listener endpoint strings: parsing, TLS with session resumption, exposure.

``ssl:`` descriptions are built here rather than by Twisted's parser so that
TLS session tickets are on: a client that reconnects resumes its TLS session
in one round trip instead of a full handshake.  Every other description goes
to ``serverFromString`` unchanged.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

from twisted.internet import ssl
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    serverFromString,
)
from twisted.python.filepath import FilePath

from .systemd import inherited_address

_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def parse(description: str) -> tuple[str, list[str], dict[str, str]]:
    """``kind:a:b:key=value`` as ``(kind, [a, b], {key: value})``; ``\\:``
    stands for a colon inside a value."""
    words = [w.replace("\\:", ":") for w in re.split(r"(?<!\\):", description)]
    args = [w for w in words[1:] if "=" not in w]
    kwargs = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    return words[0], args, kwargs


def _tls_options(private_key: str, cert_key: str | None, extra_chain: str | None) -> Any:
    key_pem = FilePath(private_key).getContent()
    cert_pem = FilePath(cert_key or private_key).getContent()
    certificate = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    chain = []
    if extra_chain:
        chain = [
            ssl.Certificate.loadPEM(pem).original
            for pem in _CERTIFICATE.findall(FilePath(extra_chain).getContent())
        ]
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        extraCertChain=chain or None,
        enableSessions=True,
        enableSessionTickets=True,
    )


def server_endpoint(reactor: Any, description: str) -> Any:
    """The server endpoint of a description; raises on a bad one or on
    certificate files that cannot be read."""
    kind, args, kwargs = parse(description)
    if kind == "systemd":
        try:
            return serverFromString(reactor, description)
        except (IndexError, KeyError):
            raise ValueError(
                "systemd handed over no such socket (is the daemon started by its "
                ".socket unit, with LISTEN_FDS and LISTEN_FDNAMES set?)"
            ) from None
    if kind != "ssl":
        return serverFromString(reactor, description)
    port = int(args[0] if args else kwargs.pop("port"))
    unknown = set(kwargs) - {"privateKey", "certKey", "extraCertChain", "interface",
                             "backlog", "port"}
    if unknown:
        raise ValueError(f"unknown ssl option {sorted(unknown)[0]!r}")
    options = _tls_options(
        kwargs.get("privateKey", "server.pem"), kwargs.get("certKey"), kwargs.get("extraCertChain")
    )
    return SSL4ServerEndpoint(
        reactor, port, options, int(kwargs.get("backlog", 50)), kwargs.get("interface", "")
    )


def inherited_socket(endpoint: Any) -> tuple[int, Any] | None:
    """``(family, sockname)`` of the socket a ``systemd:`` endpoint adopts,
    read from the socket itself; None for other endpoints.  Raises
    ``ValueError`` when it is not a socket or not of the endpoint's
    ``domain``."""
    if not isinstance(endpoint, AdoptedStreamServerEndpoint):
        return None
    try:
        family, sockname = inherited_address(endpoint.fileno)
    except OSError as e:
        raise ValueError(f"descriptor {endpoint.fileno} from systemd: {e}") from None
    if family != endpoint.addressFamily:
        have = socket.AddressFamily(family).name.removeprefix("AF_")
        raise ValueError(f"systemd handed over an AF_{have} socket: say domain={have}")
    return family, sockname


def _exposed_address(family: int, sockname: Any) -> bool:
    if family == socket.AF_UNIX:
        return False
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True
    address = ipaddress.ip_address(sockname[0].partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_loopback


def plaintext_exposed(description: str, inherited: tuple[int, Any] | None = None) -> bool:
    """Whether a listener would take unencrypted connections from beyond this
    machine.  A ``systemd:`` listener is judged by the address of the socket
    systemd bound (``inherited``, from ``inherited_socket``), as a ``tcp:``
    one is by its interface; without that address it might be, so it is."""
    kind, _, kwargs = parse(description)
    if kind in ("ssl", "unix"):
        return False
    if kind == "systemd":
        return inherited is None or _exposed_address(*inherited)
    if kind != "tcp" and kind != "tcp6":
        return True
    interface = kwargs.get("interface", "")
    if interface == "localhost":
        return False
    try:
        return not ipaddress.ip_address(interface).is_loopback
    except ValueError:  # "" (every interface) or a name
        return True
