"""Listener endpoint strings: parsing, TLS with session resumption, exposure.

``ssl:`` descriptions are built here rather than by Twisted's parser so that
TLS session tickets are on: a client that reconnects resumes its TLS session
in one round trip instead of a full handshake.  Every other description goes
to ``serverFromString`` unchanged.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.python.filepath import FilePath

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


def plaintext_exposed(description: str) -> bool:
    """Whether a listener would take unencrypted connections from beyond this
    machine (or might: a socket handed over by systemd cannot be told)."""
    kind, _, kwargs = parse(description)
    if kind in ("ssl", "unix"):
        return False
    if kind != "tcp" and kind != "tcp6":
        return True
    interface = kwargs.get("interface", "")
    if interface == "localhost":
        return False
    try:
        return not ipaddress.ip_address(interface).is_loopback
    except ValueError:  # "" (every interface) or a name
        return True
