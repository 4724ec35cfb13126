"""Password hashes with scrypt (memory-hard), in a self-describing string.

``scrypt$<n>$<r>$<p>$<salt>$<key>`` keeps the cost parameters beside the
hash, so they can be raised later without invalidating stored hashes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

# 16 MiB and about 70 ms per hash on the reference machine.
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
KEY_BYTES = 32
SALT_BYTES = 16
MAX_PASSWORD_BYTES = 1024


class PasswordError(ValueError):
    """A password that cannot be used (empty or too long)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, maxmem=256 * n * r * p, dklen=KEY_BYTES
    )


def check_password(password: str) -> bytes:
    """The password's bytes, or ``PasswordError`` saying what is wrong."""
    data = password.encode("utf-8")
    if not data:
        raise PasswordError("the password is empty")
    if len(data) > MAX_PASSWORD_BYTES:
        raise PasswordError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    return data


def hash_password(password: str, n: int = SCRYPT_N) -> str:
    """A new salted hash of ``password``."""
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(check_password(password), salt, n, SCRYPT_R, SCRYPT_P)
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded``; False for any malformed input."""
    try:
        scheme, n, r, p, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        data = check_password(password)
        expected = _unb64(key)
        actual = _scrypt(data, _unb64(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# Verified against when the user does not exist, so that an unknown name
# costs as much time as a wrong password.
DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + _b64(bytes(KEY_BYTES))
