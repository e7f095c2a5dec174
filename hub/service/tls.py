"""The hub's TLS certificate: a generated self-signed one, or the operator's; its sha256 fingerprint."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.service.errors import SetupError

__all__ = ["CERT_FILE", "KEY_FILE", "certificate_sha256", "create_self_signed"]

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"


def create_self_signed(out_dir: Path, *, hostnames: list[str] | None = None, days: int = 825) -> Path:
    """Write ``cert.pem`` and ``key.pem`` (0600) for localhost, this host's name and ``hostnames``."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = ["localhost", socket.gethostname(), *(hostnames or [])]
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(names) if not _is_ip(n)]
    alt += [
        x509.IPAddress(ipaddress.ip_address(n)) for n in ["127.0.0.1", "::1", *(hostnames or [])] if _is_ip(n)
    ]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedclinic hub")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path = out_dir / KEY_FILE
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    cert_path = out_dir / CERT_FILE
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def certificate_sha256(cert_path: Path) -> str:
    """sha256 (hex) of the DER of the first certificate in a PEM file: what a node pins."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SetupError(
            f"cannot read TLS certificate {cert_path}: {exc}; pass --cert/--key or re-init"
        ) from exc
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
