"""The page's password: stored only as a salted scrypt hash, set at install, checked in constant time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["hash_password", "is_password_hash", "verify_password"]

_PREFIX = "scrypt"
# scrypt cost: about 50 ms and 16 MiB per check here; the page caches a verified Authorization header, so
# only a new or wrong password pays it (which also slows guessing).
_N, _R, _P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` for ``password`` (a fresh 16-byte salt each time)."""
    if len(password) < 8:
        raise ValueError("the page password needs at least 8 characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM, dklen=32)
    return f"{_PREFIX}${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def is_password_hash(stored: str) -> bool:
    """Whether ``stored`` has the form ``hash_password`` writes (not whether any password matches it)."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != _PREFIX:
        return False
    try:
        n, r, p = (int(v) for v in parts[1:4])
        return n > 1 and r > 0 and p > 0 and len(_unb64(parts[4])) >= 8 and len(_unb64(parts[5])) == 32
    except ValueError:
        return False


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` is the one ``stored`` was made from."""
    if not is_password_hash(stored):
        return False
    _, n, r, p, salt, digest = stored.split("$")
    got = hashlib.scrypt(
        password.encode("utf-8"), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), maxmem=_MAXMEM, dklen=32
    )
    return hmac.compare_digest(got, _unb64(digest))
