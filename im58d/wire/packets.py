"""The packet types of the wire contract (PROTOCOL.md section 1.2).

Each packet is a ``NamedTuple`` whose fields are the MessagePack array of
its body, in order; ``TYPE_OF`` maps its class to its type byte.  Trailing
fields that default to ``None`` are optional and left out of the body when
unset.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# type bytes
LOGIN = 0x01
WELCOME = 0x02
RESUME = 0x03
RESUMED = 0x04
PING = 0x05
PONG = 0x06
BYE = 0x07
KICKED = 0x08
ERROR = 0x0F
MSG_R = 0x10
MSG_A = 0x11
MSG_N = 0x12
ACK_R = 0x13
ACK_A = 0x14
ACK_N = 0x15
PRESENCE = 0x20
CHANGED = 0x21
ONLINE = 0x22

# KICKED reasons (PROTOCOL.md 1.2)
KICKED_REPLACED = 1
KICKED_EXPIRED = 2
KICKED_SHUTDOWN = 3
KICKED_DISABLED = 4
KICKED_SIGNED_OUT = 5

# MSG_R kinds
KIND_USER = 0
KIND_GROUP = 1


class Login(NamedTuple):
    user: str
    password: str
    device_id: bytes  # 16 random bytes the app keeps for its installation
    device_name: str | None = None
    client: str | None = None


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


class Resume(NamedTuple):
    session_id: bytes
    ts: int
    nonce: bytes
    mac: bytes


class Resumed(NamedTuple):
    uid: int
    inbox_max: int
    iplist_version: int
    acked: int


class Ping(NamedTuple):
    pass


class Pong(NamedTuple):
    pass


class Bye(NamedTuple):
    pass


class Kicked(NamedTuple):
    reason: int


class Error(NamedTuple):
    code: int
    message: str
    ref: int | None = None


class MsgR(NamedTuple):
    cmid: int
    to: int
    body: str | bytes
    kind: int | None = None


class MsgA(NamedTuple):
    cmid: int
    msg_id: int
    seq: int  # the message's entry in the sender's own timeline


class MsgN(NamedTuple):
    seq: int
    msg_id: int
    sender: int  # "from" on the wire
    body: str | bytes
    ts: int
    group: int | None = None
    to: int | None = None  # on the sender's own messages, shown on its other devices


class AckR(NamedTuple):
    seq: int


class AckA(NamedTuple):
    seq: int


class AckN(NamedTuple):
    seq: int  # the sender's timeline entry whose message was received


class Presence(NamedTuple):
    uid: int
    online: bool


class Changed(NamedTuple):
    what: str
    version: int


class Online(NamedTuple):
    """The friends online now; the body is the array of their uids."""

    uids: tuple[int, ...] = ()


class UnknownPacket(NamedTuple):
    """A frame whose type byte this version does not know (answered with 501)."""

    type: int
    body: bytes


Packet = (
    Login | Welcome | Resume | Resumed | Ping | Pong | Bye | Kicked | Error
    | MsgR | MsgA | MsgN | AckR | AckA | AckN | Presence | Changed | Online
)

# Field kinds, checked on decode.
UINT = "uint"  # a MessagePack int, 0 <= x < 2**63 (never a bool)
STR = "str"
BIN8 = "bin8"
BIN16 = "bin16"
BIN32 = "bin32"
TEXT_OR_BIN = "str|bin"
BOOL = "bool"
# ONLINE only: the whole body is an array of UINT
UINTS = "uint..."

# type byte -> (class, kinds of required fields, kinds of optional fields,
#               sent by the client?)
SPECS: dict[int, tuple[Any, tuple[str, ...], tuple[str, ...], bool]] = {
    LOGIN: (Login, (STR, STR, BIN16), (STR, STR), True),
    WELCOME: (
        Welcome, (UINT, BIN16, BIN32, STR, UINT, UINT, UINT, UINT, UINT, UINT), (), False
    ),
    RESUME: (Resume, (BIN16, UINT, BIN8, BIN16), (), True),
    RESUMED: (Resumed, (UINT, UINT, UINT, UINT), (), False),
    PING: (Ping, (), (), True),
    PONG: (Pong, (), (), False),
    BYE: (Bye, (), (), True),
    KICKED: (Kicked, (UINT,), (), False),
    ERROR: (Error, (UINT, STR), (UINT,), False),
    MSG_R: (MsgR, (UINT, UINT, TEXT_OR_BIN), (UINT,), True),
    MSG_A: (MsgA, (UINT, UINT, UINT), (), False),
    MSG_N: (MsgN, (UINT, UINT, UINT, TEXT_OR_BIN, UINT), (UINT, UINT), False),
    ACK_R: (AckR, (UINT,), (), True),
    ACK_A: (AckA, (UINT,), (), False),
    ACK_N: (AckN, (UINT,), (), False),
    PRESENCE: (Presence, (UINT, BOOL), (), False),
    CHANGED: (Changed, (STR, UINT), (), False),
    ONLINE: (Online, (), (UINTS,), False),
}

NAMES = {code: spec[0].__name__ for code, spec in SPECS.items()}

CLIENT_TYPES = frozenset(code for code, spec in SPECS.items() if spec[3])
SERVER_TYPES = frozenset(code for code, spec in SPECS.items() if not spec[3])

TYPE_OF: dict[Any, int] = {spec[0]: code for code, spec in SPECS.items()}
