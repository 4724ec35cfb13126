"""Sans-IO framing: ``varint(n) ‖ type ‖ MessagePack body`` (PROTOCOL.md 1.1).

``Decoder.feed`` takes whatever bytes the transport delivered and yields
typed packets; it never buffers more than one frame of at most
``max_frame`` bytes, and rejects a larger length prefix as soon as the
prefix is complete.  ``encode`` and ``frame`` build outgoing frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack

from .packets import (
    ACK_R,
    BIN8,
    BIN16,
    BIN32,
    BOOL,
    MSG_R,
    ONLINE,
    SPECS,
    STR,
    TEXT_OR_BIN,
    TYPE_OF,
    UINT,
    UINTS,
    AckR,
    MsgR,
    Online,
    Packet,
    UnknownPacket,
)

DEFAULT_MAX_FRAME = 65536
MAX_VARINT_BYTES = 5
UINT_LIMIT = 1 << 63  # what SQLite's INTEGER holds

# The reactor thread is the only encoder; reusing one Packer halves the cost
# of msgpack.packb.
_pack = msgpack.Packer(use_bin_type=True).pack


class WireError(Exception):
    """A frame that cannot be accepted; ``code`` is the ERROR code to answer."""

    code = 400


class MalformedFrame(WireError):
    """Bad framing, bad MessagePack or a field of the wrong type (ERROR 400)."""

    code = 400


class FrameTooLarge(WireError):
    """A length prefix above the limit (ERROR 413); nothing was buffered."""

    code = 413


def varint(n: int) -> bytes:
    """Unsigned LEB128 of ``n``."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def frame(type_: int, fields: tuple[Any, ...] | list[Any]) -> bytes:
    """One frame of packet type ``type_`` with ``fields`` as its body."""
    body = _pack(fields) if fields else b""
    n = len(body) + 1
    if n < 0x80:
        return bytes((n, type_)) + body
    return varint(n) + bytes((type_,)) + body


# ONLINE with nobody online: the contract's empty array, not an empty body
_ONLINE_NOBODY = bytes((2, ONLINE)) + _pack([])


def encode(packet: Packet) -> bytes:
    """The frame of a typed packet; unset optional trailing fields are left out."""
    if type(packet) is Online:
        # the body is the array of uids itself, ``[]`` when there are none
        uids = packet.uids
        return frame(ONLINE, list(uids)) if uids else _ONLINE_NOBODY
    fields: tuple[Any, ...] = packet
    if fields and fields[-1] is None:
        end = len(fields)
        while end and fields[end - 1] is None:
            end -= 1
        fields = fields[:end]
    return frame(TYPE_OF[type(packet)], fields)


def _check(kind: str, value: Any) -> bool:
    if kind == UINT:
        return type(value) is int and 0 <= value < UINT_LIMIT
    if kind == STR:
        return type(value) is str
    if kind == TEXT_OR_BIN:
        return type(value) is str or type(value) is bytes
    if kind == BIN16:
        return type(value) is bytes and len(value) == 16
    if kind == BIN32:
        return type(value) is bytes and len(value) == 32
    if kind == BIN8:
        return type(value) is bytes and len(value) == 8
    if kind == BOOL:
        return type(value) is bool
    raise AssertionError(kind)


_new = tuple.__new__
_unpackb = msgpack.unpackb
# the big-endian uints of MessagePack (0xcc..0xcf) by their first byte: length
_UINT_BYTES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _fast(type_: int, body: bytes) -> Any:
    """The two packets every message brings (ACK_R, MSG_R) when they are
    well formed, decoded with a few checks inline; None for anything else,
    which the general path decodes (or refuses, saying why)."""
    if type_ == ACK_R:
        # [seq]: a fixarray of one uint
        if len(body) == 2 and body[0] == 0x91 and body[1] < 0x80:
            return _new(AckR, (body[1],))
        if len(body) > 2 and body[0] == 0x91:
            size = _UINT_BYTES.get(body[1])
            if size is not None and len(body) == 2 + size:
                seq = int.from_bytes(body[2:], "big")
                if seq < UINT_LIMIT:
                    return _new(AckR, (seq,))
        return None
    try:
        fields = _unpackb(body, raw=False, strict_map_key=True)
    except Exception:
        return None
    if type(fields) is not list or not 3 <= len(fields) <= 4:
        return None
    cmid, to, text = fields[0], fields[1], fields[2]
    if not (type(cmid) is int and type(to) is int and 0 <= cmid < UINT_LIMIT
            and 0 <= to < UINT_LIMIT and (type(text) is str or type(text) is bytes)):
        return None
    kind = fields[3] if len(fields) == 4 else None
    if kind is not None and not (type(kind) is int and 0 <= kind < UINT_LIMIT):
        return None
    return _new(MsgR, (cmid, to, text, kind))


def decode_body(type_: int, body: bytes) -> Packet | UnknownPacket:
    """The typed packet for one frame's ``type ‖ body``; raises ``MalformedFrame``."""
    if type_ == ACK_R or type_ == MSG_R:
        packet = _fast(type_, body)
        if packet is not None:
            return packet  # type: ignore[no-any-return]
    spec = SPECS.get(type_)
    if spec is None:
        return UnknownPacket(type_, body)
    cls, required, optional, _ = spec
    if optional == (UINTS,):
        return _decode_uints(cls, body)  # type: ignore[no-any-return]
    if not body:
        fields: list[Any] = []
    else:
        try:
            fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated types
            raise MalformedFrame(f"body is not MessagePack: {e}") from None
        if type(fields) is not list:
            raise MalformedFrame("body is not a MessagePack array")
    nreq = len(required)
    if len(fields) < nreq:
        raise MalformedFrame(f"{cls.__name__} needs {nreq} fields, got {len(fields)}")
    # Fields past the known ones are ignored, so a newer client can append
    # optional fields without breaking older servers.
    kinds = required + optional
    if len(fields) > len(kinds):
        del fields[len(kinds):]
    for i, value in enumerate(fields):
        if value is None and i >= nreq:
            continue  # an optional field sent as nil is unset
        if not _check(kinds[i], value):
            name = cls._fields[i]
            raise MalformedFrame(f"{cls.__name__}.{name} must be {kinds[i]}")
    return cls(*fields)  # type: ignore[no-any-return]


def _decode_uints(cls: Any, body: bytes) -> Any:
    """A packet whose body is an array of any number of uints (ONLINE)."""
    values: Any = []
    if body:
        try:
            values = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as e:
            raise MalformedFrame(f"body is not MessagePack: {e}") from None
        if type(values) is not list:
            raise MalformedFrame("body is not a MessagePack array")
        for value in values:
            if not _check(UINT, value):
                raise MalformedFrame(f"{cls.__name__}.uids must be uint")
    return cls(tuple(values))


class Decoder:
    """Turns a byte stream into packets, one frame at a time.

    After a ``WireError`` the stream is unusable: the framing is lost or the
    peer is hostile, and the connection must be closed.
    """

    __slots__ = ("max_frame", "_buf", "_error")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = b""
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held of an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> Iterator[Packet | UnknownPacket]:
        """Take ``data`` and yield every complete packet that has arrived.

        The bytes are held at once, whether or not the iterator is consumed;
        an earlier error is raised at once.
        """
        if self._error is not None:
            raise self._error
        self._buf = self._buf + data if self._buf else data
        return self._packets()

    def _packets(self) -> Iterator[Packet | UnknownPacket]:
        buf = self._buf
        end = len(buf)
        pos = 0
        max_frame = self.max_frame
        try:
            while pos < end:
                n = buf[pos]
                head = pos + 1
                if n >= 0x80:
                    n &= 0x7F
                    shift = 7
                    # n only grows with more prefix bytes: refuse it as soon
                    # as it is over the limit, however the stream was cut
                    if n > max_frame:
                        raise FrameTooLarge(f"frame over {max_frame} bytes")
                    while True:
                        if head == end:
                            return
                        b = buf[head]
                        head += 1
                        n |= (b & 0x7F) << shift
                        shift += 7
                        if n > max_frame:
                            raise FrameTooLarge(f"frame over {max_frame} bytes")
                        if b < 0x80:
                            break
                        if head - pos >= MAX_VARINT_BYTES:
                            raise MalformedFrame("length prefix longer than 5 bytes")
                if n > max_frame:
                    raise FrameTooLarge(f"frame over {max_frame} bytes")
                if n == 0:
                    raise MalformedFrame("empty frame (no type byte)")
                stop = head + n
                if stop > end:
                    return
                packet = decode_body(buf[head], buf[head + 1 : stop])
                pos = stop
                yield packet
        except WireError as e:
            self._error = e
            pos = end
            raise
        finally:
            self._buf = buf[pos:] if pos < end else b""
