"""Ed25519 signature verification (RFC 8032) in pure Python: the kit's bootstrap checks the kit with it.

The clinic PC has only the system python3 when the kit is checked, so ``cryptography`` is not available yet;
trusting a wheel of it to check the kit that contains it would be circular. Verification only (no secrets are
handled here), so constant time is not needed; speed is a few milliseconds per signature.
"""

from __future__ import annotations

import hashlib

__all__ = ["PUBLIC_KEY_LENGTH", "SIGNATURE_LENGTH", "verify"]

PUBLIC_KEY_LENGTH = 32
SIGNATURE_LENGTH = 64

_P = 2**255 - 19  # the field prime
_L = 2**252 + 27742317777372353535851937790883648493  # order of the base point
_D = (-121665 * pow(121666, -1, _P)) % _P  # curve constant of -x^2 + y^2 = 1 + d x^2 y^2
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)  # a square root of -1 mod p

# A point in extended coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, x*y = T/Z.
_Point = tuple[int, int, int, int]
_IDENTITY: _Point = (0, 1, 1, 0)


def _add(p: _Point, q: _Point) -> _Point:
    # Unified addition for a = -1 twisted Edwards curves (Hisil-Wong-Carter-Dawson 2008); also doubles.
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = 2 * t1 * t2 * _D % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _multiply(scalar: int, point: _Point) -> _Point:
    result = _IDENTITY
    addend = point
    while scalar:
        if scalar & 1:
            result = _add(result, addend)
        addend = _add(addend, addend)
        scalar >>= 1
    return result


def _recover_x(y: int, sign: int) -> int | None:
    """The x with the given low bit on the curve at y, or None when y is not on the curve."""
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x2 = u * pow(v, -1, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if x & 1 != sign:
        x = _P - x
    return x


def _decode(encoded: bytes) -> _Point | None:
    value = int.from_bytes(encoded, "little")
    y = value & ((1 << 255) - 1)
    x = _recover_x(y, value >> 255)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


def _same(p: _Point, q: _Point) -> bool:
    # Projective equality: x1/z1 == x2/z2 and y1/z1 == y2/z2 without inversions.
    return (p[0] * q[2] - q[0] * p[2]) % _P == 0 and (p[1] * q[2] - q[1] * p[2]) % _P == 0


_BASE_Y = 4 * pow(5, -1, _P) % _P
_BASE_X = _recover_x(_BASE_Y, 0)
assert _BASE_X is not None
_BASE: _Point = (_BASE_X, _BASE_Y, 1, _BASE_X * _BASE_Y % _P)


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by raw 32-byte ``public_key``."""
    if len(public_key) != PUBLIC_KEY_LENGTH or len(signature) != SIGNATURE_LENGTH:
        return False
    a = _decode(public_key)
    r = _decode(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:  # RFC 8032 5.1.7: reject non-canonical S (signature malleability)
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % _L
    # [S]B == R + [h]A
    return _same(_multiply(s, _BASE), _add(r, _multiply(h, a)))
