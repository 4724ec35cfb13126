"""The daemon's configuration: embedded defaults, an INI file, command-line overrides.

Every key is coerced and checked when the file is read; an unknown section or
key, or a bad value, is a ``ConfigError`` whose message names it.  The keys
of PROTOCOL.md section 4 are a contract; the others are documented in
``etc/im58d.ini``.
"""

from __future__ import annotations

import configparser
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .routing.iplist import AccessServer, parse_server


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Config:
    # [store]
    database: str = "im58d.sqlite"
    synchronous: str = "normal"
    # [listen]
    access: tuple[str, ...] = ("tcp:5858:interface=127.0.0.1",)
    http: tuple[str, ...] = ("tcp:8058:interface=127.0.0.1",)
    max_frame: int = 65536
    allow_plaintext: bool = False
    # [session]
    linger: int = 300
    heartbeat: int = 240
    login_timeout: int = 60
    max_devices: int = 5
    expire_days: int = 90
    # [login]
    user_attempts: int = 5
    address_attempts: int = 20
    attempt_window: int = 900
    # [messages]
    max_body: int = 4096
    friends_only: bool = False
    retransmit: int = 10
    batch_window: int = 20
    # [groups]
    max_members: int = 500
    # [admin]
    admin_token: str = ""
    # [routing]
    routing_backend: str = "local"
    redis: str = "tcp:127.0.0.1:6379"
    node_ttl: int = 15
    weight: int = 1
    # [iplist]
    iplist: tuple[AccessServer, ...] = field(default=())
    # [log]
    log_format: str = "text"
    # where the values came from, for messages
    source: str = "embedded defaults"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return parse


_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True,
             "no": False, "false": False, "off": False, "0": False}


def _bool(text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not yes or no") from None


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _text(text: str) -> str:
    return text


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def _redis_endpoint(text: str) -> str:
    """A client endpoint with its address: tcp or tls with a host and a port
    in 1..65535, or unix with a path (positional or ``key=value``)."""
    kind, _, rest = text.partition(":")
    args = [f for f in rest.split(":") if "=" not in f]
    kw = dict(f.split("=", 1) for f in rest.split(":") if "=" in f)
    if kind in ("tcp", "tls"):
        host = kw.get("host") or (args[0] if args else "")
        port = kw.get("port") or (args[1] if len(args) > 1 else "")
        if host and port.isdigit() and 1 <= int(port) <= 65535:
            return text
    elif kind == "unix" and (kw.get("path") or (args[0] if args else "")):
        return text
    raise ValueError(f"{text!r} is not a client endpoint (tcp:HOST:PORT, unix:PATH, tls:HOST:PORT)")


def _lines(text: str) -> tuple[str, ...]:
    values = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not values:
        raise ValueError("needs at least one entry")
    return values


def _servers(text: str) -> tuple[AccessServer, ...]:
    return tuple(parse_server(line) for line in _lines(text))


# section -> key -> (Config attribute, parser)
SCHEMA: dict[str, dict[str, tuple[str, Callable[[str], Any]]]] = {
    "store": {
        "database": ("database", _nonempty),
        "synchronous": ("synchronous", _choice("normal", "full", "extra")),
    },
    "listen": {
        "access": ("access", _lines),
        "http": ("http", _lines),
        "max_frame": ("max_frame", _int(64, 16 * 1024 * 1024)),
        "allow_plaintext": ("allow_plaintext", _bool),
    },
    "session": {
        "linger": ("linger", _int(0, 7 * 86400)),
        "heartbeat": ("heartbeat", _int(10, 3600)),
        "login_timeout": ("login_timeout", _int(5, 3600)),
        "max_devices": ("max_devices", _int(1, 100)),
        "expire_days": ("expire_days", _int(1, 36500)),
    },
    "login": {
        "user_attempts": ("user_attempts", _int(1, 1000)),
        "address_attempts": ("address_attempts", _int(1, 100000)),
        "attempt_window": ("attempt_window", _int(1, 86400)),
    },
    "messages": {
        "max_body": ("max_body", _int(1, 1024 * 1024)),
        "friends_only": ("friends_only", _bool),
        "retransmit": ("retransmit", _int(1, 3600)),
        "batch_window": ("batch_window", _int(0, 1000)),
    },
    "groups": {
        "max_members": ("max_members", _int(2, 100000)),
    },
    "admin": {
        "token": ("admin_token", _text),
    },
    "routing": {
        "backend": ("routing_backend", _choice("local", "redis")),
        "redis": ("redis", _redis_endpoint),
        "node_ttl": ("node_ttl", _int(3, 600)),
        "weight": ("weight", _int(1, 1000)),
    },
    "iplist": {
        "servers": ("iplist", _servers),
    },
    "log": {
        "format": ("log_format", _choice("text", "json")),
    },
}


def parse_config(text: str, source: str = "<string>") -> Config:
    """A ``Config`` from INI text; ``ConfigError`` names the first bad key."""
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";",),
        interpolation=None,
        default_section="\0none",
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source)
    except configparser.Error as e:
        message = str(e).replace("\n", " ")
        raise ConfigError(f"{source}: {message}") from None
    values: dict[str, Any] = {}
    for section in parser.sections():
        keys = SCHEMA.get(section)
        if keys is None:
            raise ConfigError(f"{source}: unknown section [{section}]")
        for key, raw in parser.items(section):
            if key not in keys:
                raise ConfigError(f"{source}: [{section}] {key}: unknown key")
            attribute, parse = keys[key]
            try:
                values[attribute] = parse(raw.strip())
            except ValueError as e:
                raise ConfigError(f"{source}: [{section}] {key}: {e}") from None
    config = Config(source=source, **values)
    check(config)
    return config


# what a MSG_R frame holds besides its body, at most
MSG_R_OVERHEAD = 48


def check(config: Config) -> None:
    """Keys that must agree with each other."""
    if config.max_body + MSG_R_OVERHEAD > config.max_frame:
        raise ConfigError(
            f"{config.source}: [messages] max_body: {config.max_body} does not fit in "
            f"[listen] max_frame ({config.max_frame}); raise max_frame to at least "
            f"{config.max_body + MSG_R_OVERHEAD}"
        )



def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    return parse_config(text, path)
