"""The RESUME proof of PROTOCOL.md 1.3, in one place for the daemon, the SDK,
the bench and the tests.  It imports nothing of im58d, so every layer may use
it."""

from __future__ import annotations

import hashlib
import hmac


def resume_mac(key: bytes, session_id: bytes, ts: int, nonce: bytes) -> bytes:
    """``HMAC-SHA256(session_key, session_id ‖ ts as 8 bytes big-endian ‖
    nonce)[:16]``."""
    message = session_id + ts.to_bytes(8, "big") + nonce
    return hmac.new(key, message, hashlib.sha256).digest()[:16]
