"""The wire codec of the TCP long connection (PROTOCOL.md section 1), sans-IO."""

from . import packets
from .codec import (
    DEFAULT_MAX_FRAME,
    Decoder,
    FrameTooLarge,
    MalformedFrame,
    WireError,
    decode_body,
    encode,
    frame,
    varint,
)

__all__ = [
    "packets",
    "DEFAULT_MAX_FRAME",
    "Decoder",
    "FrameTooLarge",
    "MalformedFrame",
    "WireError",
    "decode_body",
    "encode",
    "frame",
    "varint",
]
