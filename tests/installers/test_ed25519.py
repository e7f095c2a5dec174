"""The pure-Python Ed25519 verifier agrees with OpenSSL (through cryptography) on good and bad signatures."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from installers import ed25519


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_accepts_what_openssl_signs_and_rejects_any_change() -> None:
    for n in (0, 1, 31, 64, 1000):
        key = Ed25519PrivateKey.generate()
        message = os.urandom(n)
        signature = key.sign(message)
        assert ed25519.verify(_raw(key), message, signature)
        assert not ed25519.verify(_raw(key), message + b"\0", signature)
        for i in (0, 31, 32, 63):  # R and S halves
            bad = bytearray(signature)
            bad[i] ^= 0x01
            assert not ed25519.verify(_raw(key), message, bytes(bad))
        assert not ed25519.verify(_raw(Ed25519PrivateKey.generate()), message, signature)


def test_rfc8032_test_vector_1() -> None:
    # RFC 8032 section 7.1, TEST 1 (empty message).
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    signature = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert ed25519.verify(public, b"", signature)


def test_rejects_wrong_lengths_and_non_canonical_s() -> None:
    key = Ed25519PrivateKey.generate()
    signature = key.sign(b"kit")
    assert not ed25519.verify(_raw(key)[:31], b"kit", signature)
    assert not ed25519.verify(_raw(key), b"kit", signature[:63])
    # S + L verifies mathematically but is a malleated signature: RFC 8032 requires S < L.
    s = int.from_bytes(signature[32:], "little") + ed25519._L
    assert s < 2**256
    assert not ed25519.verify(_raw(key), b"kit", signature[:32] + s.to_bytes(32, "little"))
