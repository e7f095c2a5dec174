"""The hub's data directory: ``init`` creates keys, admin token, TLS certificate and the database."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_node.protocol.signing import fingerprint, public_key_pem
from hub.service.errors import SetupError
from hub.service.settings import CONFIG_FILE, HubSettings
from hub.service.tls import CERT_FILE, certificate_sha256, create_self_signed
from hub.store.database import open_database

__all__ = [
    "InitReport",
    "admin_token_matches",
    "init_data_dir",
    "load_signing_key",
    "public_key",
    "read_admin_token",
]

logger = logging.getLogger(__name__)

SIGNING_KEY = "hub.key"
PUBLIC_KEY = "hub.pub"


@dataclass(frozen=True)
class InitReport:
    data_dir: Path
    database: str
    migration: str
    key_fingerprint: str
    tls_sha256: str
    admin_token_file: Path
    created: list[str]


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def init_data_dir(settings: HubSettings, *, public_url: str | None = None) -> InitReport:
    """Create what is missing (never overwrites): signing key, admin token, TLS cert, hub.toml, schema."""
    created: list[str] = []
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    key_file = settings.keys_dir / SIGNING_KEY
    if not key_file.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_private(key_file, pem)
        (settings.keys_dir / PUBLIC_KEY).write_bytes(public_key_pem(key.public_key()))
        created.append(str(key_file))
    if not settings.admin_token_file.exists():
        _write_private(settings.admin_token_file, (secrets.token_urlsafe(32) + "\n").encode())
        created.append(str(settings.admin_token_file))
    if not (settings.tls_dir / CERT_FILE).exists():
        create_self_signed(settings.tls_dir)
        created.append(str(settings.tls_dir / CERT_FILE))
    config = settings.data_dir / CONFIG_FILE
    if not config.exists():
        lines = ["# fedclinic hub settings; FEDCLINIC_HUB_<KEY> environment variables override these."]
        if settings.database_url:
            lines.append(f'database_url = "{settings.database_url}"')
        if public_url or settings.public_url:
            lines.append(f'public_url = "{public_url or settings.public_url}"')
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        created.append(str(config))
    settings.artifacts_dir.mkdir(exist_ok=True)
    db = open_database(settings.db_url)
    try:
        migration = db.current_revision() or ""
        database = db.describe()
    finally:
        db.close()
    return InitReport(
        data_dir=settings.data_dir,
        database=database,
        migration=migration,
        key_fingerprint=fingerprint(public_key(settings)),
        tls_sha256=certificate_sha256(settings.tls_dir / CERT_FILE),
        admin_token_file=settings.admin_token_file,
        created=created,
    )


def _check_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise SetupError(f"cannot read {path}: {exc.strerror}; run `fedclinic-hub init`") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SetupError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`"
        )
    return data


def load_signing_key(settings: HubSettings) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(_check_private(settings.keys_dir / SIGNING_KEY), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SetupError(f"{settings.keys_dir / SIGNING_KEY} is not an Ed25519 private key")
    return key


def public_key(settings: HubSettings) -> Ed25519PublicKey:
    return load_signing_key(settings).public_key()


def read_admin_token(settings: HubSettings) -> str:
    return _check_private(settings.admin_token_file).decode().strip()


def admin_token_matches(expected_sha256: str, presented: str) -> bool:
    """Constant-time comparison of a presented admin token against the stored token's sha256."""
    digest = hashlib.sha256(presented.encode()).hexdigest()
    return hmac.compare_digest(digest, expected_sha256)
