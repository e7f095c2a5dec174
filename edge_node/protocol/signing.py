"""Ed25519 public keys on the edge: load trusted keys, verify detached signatures, fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_node.protocol.errors import SignatureError

__all__ = [
    "PUBLIC_KEY_SUFFIX",
    "SIGNATURE_LENGTH",
    "find_signer",
    "fingerprint",
    "load_public_key",
    "load_public_keys",
    "public_key_pem",
    "verify_signature",
]

#: Trusted hub keys in a directory are the files ending in this suffix.
PUBLIC_KEY_SUFFIX = ".pub"
#: An Ed25519 signature is always 64 bytes.
SIGNATURE_LENGTH = 64


def fingerprint(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key: short, stable, safe to log."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read one PEM (SubjectPublicKeyInfo) Ed25519 public key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read trusted key {path}: {exc.strerror}; check the path") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(
            f"{path} is not a PEM public key; copy the hub's hub.pub (from `fedclinic-hub keys create`)"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """Trusted keys from one PEM file, or from every ``*.pub`` file of a directory (sorted by name)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == PUBLIC_KEY_SUFFIX and p.is_file())
        if not files:
            raise SignatureError(f"no *{PUBLIC_KEY_SUFFIX} key files in {path}; put the hub's hub.pub there")
        return [load_public_key(p) for p in files]
    return [load_public_key(path)]


def verify_signature(key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``key``'s Ed25519 signature of ``data``."""
    if len(signature) != SIGNATURE_LENGTH:
        return False
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def find_signer(keys: Sequence[Ed25519PublicKey], data: bytes, signature: bytes) -> Ed25519PublicKey | None:
    """The first trusted key whose signature ``signature`` is, or None."""
    for key in keys:
        if verify_signature(key, data, signature):
            return key
    return None
