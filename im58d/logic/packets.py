"""What the logic layer tells a device: the server's packets as domain objects.

Each is a ``NamedTuple`` whose fields are those of the packet of the same
name in PROTOCOL.md section 1.2, in order; ``CODE`` gives its type byte.
The logic layer hands them to an ``IConnection``; only the access layer
encodes them (and the routing layer carries them to other nodes as
``(code, fields)``), so the logic layer never touches bytes.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Welcome(NamedTuple):
    uid: int
    session_id: bytes
    session_key: bytes
    token: str
    inbox_max: int
    heartbeat_s: int
    linger_s: int
    iplist_version: int
    last_cmid: int
    acked: int


class Resumed(NamedTuple):
    uid: int
    inbox_max: int
    iplist_version: int
    acked: int


class Kicked(NamedTuple):
    reason: int


class MsgA(NamedTuple):
    cmid: int
    msg_id: int
    seq: int


class MsgN(NamedTuple):
    seq: int
    msg_id: int
    sender: int
    body: str | bytes
    ts: int
    group: int | None = None
    to: int | None = None


class AckA(NamedTuple):
    seq: int


class AckN(NamedTuple):
    seq: int


class Presence(NamedTuple):
    uid: int
    online: bool


class Changed(NamedTuple):
    what: str
    version: int


class Online(NamedTuple):
    uids: tuple[int, ...] = ()


Packet = Welcome | Resumed | Kicked | MsgA | MsgN | AckA | AckN | Presence | Changed | Online

# KICKED reasons
REPLACED = 1
EXPIRED = 2
SHUTDOWN = 3
DISABLED = 4
SIGNED_OUT = 5

CODE: dict[type, int] = {
    Welcome: 0x02,
    Resumed: 0x04,
    Kicked: 0x08,
    MsgA: 0x11,
    MsgN: 0x12,
    AckA: 0x14,
    AckN: 0x15,
    Presence: 0x20,
    Changed: 0x21,
    Online: 0x22,
}
BY_CODE: dict[int, Any] = {code: cls for cls, code in CODE.items()}


def from_fields(code: int, fields: list[Any]) -> Packet:
    """The packet of type ``code`` with these fields (from another node)."""
    cls = BY_CODE[code]
    if cls is Online:
        return Online(tuple(fields))
    return cls(*fields)  # type: ignore[no-any-return]
