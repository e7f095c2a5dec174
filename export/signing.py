"""Hub signing keys (Ed25519): create, save (private keys 0600), load, and sign manifests."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_node.protocol.errors import SignatureError
from edge_node.protocol.signing import fingerprint, load_public_key, public_key_pem
from export.errors import KeyFileError

if TYPE_CHECKING:  # the key commands need no manifest models (pydantic schemas take a while to build)
    from edge_node.protocol.manifest import Manifest

logger = logging.getLogger(__name__)

PRIVATE_KEY_FILE = "hub.key"
PUBLIC_KEY_FILE = "hub.pub"


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path, *, overwrite: bool = False) -> Path:
    """Write an unencrypted PKCS#8 PEM readable by the owner only (0600 from creation, never briefly open)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a signing key") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)  # O_TRUNC on an existing file keeps its old mode
    return path


def save_public_key(key: Ed25519PublicKey, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(public_key_pem(key))
    return path


def create_keypair(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create ``hub.key`` (private, 0600) and ``hub.pub`` in ``out_dir``; returns both paths."""
    key = generate_private_key()
    private = save_private_key(key, out_dir / PRIVATE_KEY_FILE, overwrite=overwrite)
    public = save_public_key(key.public_key(), out_dir / PUBLIC_KEY_FILE)
    logger.info("created signing key %s", fingerprint(key.public_key()))
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; refuses a file that group or others can read (like ssh does)."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"cannot read signing key {path}: {exc.strerror}; create one with `fedclinic-hub keys create`"
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"signing key {path} is accessible by others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key_file(path: Path) -> Ed25519PublicKey:
    """Read a PEM public key (hub.pub), mapping the protocol's error to an export error."""
    try:
        return load_public_key(path)
    except SignatureError as exc:
        raise KeyFileError(str(exc)) from exc


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> bytes:
    """Detached Ed25519 signature (64 bytes) over ``manifest.canonical_bytes()``."""
    return key.sign(manifest.canonical_bytes())
