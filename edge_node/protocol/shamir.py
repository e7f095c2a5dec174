"""Shamir secret sharing of 32-byte secrets, t of n, over the prime field of p = 2^521 − 1.

A secret (a mask seed or an X25519 private key) is the constant term of a random polynomial of degree t − 1;
share i is the polynomial at x = i (i = 1..n). Any t shares give the secret back by Lagrange interpolation
at 0; fewer reveal nothing about it. The Mersenne prime 2^521 − 1 is larger than any 32-byte secret, so a
secret is one field element. Coefficients come from ``secrets`` (the OS's CSPRNG).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from edge_node.protocol.errors import SecAggError

__all__ = ["PRIME", "SHARE_BYTES", "Share", "combine", "split"]

#: The field's prime modulus (a Mersenne prime).
PRIME = 2**521 - 1
#: A share's value as big-endian bytes.
SHARE_BYTES = 66
_SECRET_BYTES = 32


@dataclass(frozen=True)
class Share:
    """Share number ``x`` (1..n) of a secret: the point (x, y) of its polynomial."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """Fixed-size encoding: 2 bytes of x, then 66 bytes of y (big-endian)."""
        return self.x.to_bytes(2, "big") + self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        if len(raw) != 2 + SHARE_BYTES:
            raise SecAggError(f"a share is {2 + SHARE_BYTES} bytes, got {len(raw)}")
        x, y = int.from_bytes(raw[:2], "big"), int.from_bytes(raw[2:], "big")
        if not x >= 1 or y >= PRIME:
            raise SecAggError("a share is out of the field's range")
        return cls(x, y)


def split(secret: bytes, threshold: int, count: int) -> list[Share]:
    """``count`` shares of a 32-byte secret, any ``threshold`` of which give it back."""
    if len(secret) != _SECRET_BYTES:
        raise SecAggError(f"a shared secret is {_SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= count or count >= 2**16:
        raise SecAggError(f"need 1 <= threshold <= count < 65536, got t={threshold}, n={count}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def combine(shares: Mapping[int, Share] | list[Share], threshold: int) -> bytes:
    """The secret from at least ``threshold`` distinct shares (Lagrange interpolation at x = 0)."""
    points = list(shares.values()) if isinstance(shares, Mapping) else list(shares)
    xs = {s.x for s in points}
    if len(xs) != len(points):
        raise SecAggError("two shares have the same index")
    if len(points) < threshold:
        raise SecAggError(f"need {threshold} shares to reconstruct, have {len(points)}")
    points = points[:threshold]
    secret = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (-pj.x) % PRIME
                den = den * (pi.x - pj.x) % PRIME
        secret = (secret + pi.y * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * _SECRET_BYTES):
        raise SecAggError("the shares do not belong to one 32-byte secret")
    return secret.to_bytes(_SECRET_BYTES, "big")
