"""The kit format (stdlib only): ``kit.json`` lists every file with sha256 and size, ``kit.sig`` signs it.

A kit is a directory::

    install.py            the bootstrap, run with the clinic's system python3
    bootstrap/installers/ the stdlib modules install.py needs to check the kit (this one, ed25519, errors)
    kit.json              the manifest below, canonical JSON
    kit.sig               Ed25519 signature of kit.json's bytes by the hub key
    hub.pub               the hub's public key (PEM); its fingerprint is checked against the operator's
    constraints.txt       every wheel's exact version (pip --constraint)
    wheelhouse/*.whl      fedclinic and exactly the dependencies of fedclinic[edge,<variant>]
    README-clinic.md      what the clinic IT person reads first
    bundle/ (optional)    a signed model bundle to start with

``kit.json`` and ``kit.sig`` are the only files not listed in the manifest. Checking a kit means: the
signature
verifies with hub.pub, hub.pub is the key the operator named (when named), every listed file exists with its
size and sha256, and no other file is present. Nothing is installed before that check passes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from installers import ed25519
from installers.errors import KitError

__all__ = [
    "KIT_FORMAT",
    "MANIFEST_FILE",
    "PUBLIC_KEY_FILE",
    "SIGNATURE_FILE",
    "KitFile",
    "KitManifest",
    "canonical_json",
    "file_digest",
    "key_fingerprint",
    "raw_public_key",
    "verify_kit",
]

KIT_FORMAT = 1
MANIFEST_FILE = "kit.json"
SIGNATURE_FILE = "kit.sig"
PUBLIC_KEY_FILE = "hub.pub"
WHEELHOUSE = "wheelhouse"
CONSTRAINTS_FILE = "constraints.txt"
BUNDLE_DIR = "bundle"
_UNLISTED = {MANIFEST_FILE, SIGNATURE_FILE}
# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE, AlgorithmIdentifier 1.3.101.112,
# BIT STRING.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def canonical_json(obj: Any) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8, newline-free."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def raw_public_key(pem: bytes) -> bytes:
    """The 32 raw key bytes of a PEM Ed25519 public key (the hub.pub that ``fedclinic-hub keys`` writes)."""
    lines = [ln.strip() for ln in pem.decode("ascii", "replace").splitlines()]
    try:
        start = lines.index("-----BEGIN PUBLIC KEY-----")
        end = lines.index("-----END PUBLIC KEY-----")
        der = base64.b64decode("".join(lines[start + 1 : end]), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise KitError(
            f"{PUBLIC_KEY_FILE} is not a PEM public key; ask the hub operator for a new kit"
        ) from exc
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        raise KitError(f"{PUBLIC_KEY_FILE} is not an Ed25519 public key; ask the hub operator for a new kit")
    return der[len(_ED25519_SPKI_PREFIX) :]


def key_fingerprint(raw: bytes) -> str:
    """First 16 hex digits of sha256 of the raw key: as ``fedclinic-hub keys show`` prints it."""
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class KitFile:
    """One listed file: path relative to the kit (POSIX separators), sha256 hex, size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class KitManifest:
    """What ``kit.json`` says: the package to install, for which target, and every file."""

    fedclinic_version: str
    variant: str  # "cpu" or "gpu"
    requirement: str  # what pip installs, e.g. "fedclinic[edge,cpu]==0.1.0"
    python: str  # the interpreter the wheels are for, e.g. "3.11"
    platform: str  # the platform tag the wheels are for, e.g. "manylinux_2_28_x86_64"
    files: tuple[KitFile, ...]
    created: str = ""
    join_code: str | None = None
    hub_fingerprint: str | None = None  # the hub's TLS certificate fingerprint, for the join step
    format: int = KIT_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "fedclinic_version": self.fedclinic_version,
            "variant": self.variant,
            "requirement": self.requirement,
            "python": self.python,
            "platform": self.platform,
            "created": self.created,
            "join_code": self.join_code,
            "hub_fingerprint": self.hub_fingerprint,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: Any) -> KitManifest:
        if not isinstance(data, dict) or data.get("format") != KIT_FORMAT:
            raise KitError(
                f"{MANIFEST_FILE} is not a format-{KIT_FORMAT} kit; this installer needs a kit from the same "
                "fedclinic release, ask the hub operator for one"
            )
        try:
            files = tuple(KitFile(str(f["path"]), str(f["sha256"]), int(f["size"])) for f in data["files"])
            return cls(
                fedclinic_version=str(data["fedclinic_version"]),
                variant=str(data["variant"]),
                requirement=str(data["requirement"]),
                python=str(data["python"]),
                platform=str(data["platform"]),
                created=str(data.get("created", "")),
                join_code=data.get("join_code"),
                hub_fingerprint=data.get("hub_fingerprint"),
                files=files,
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KitError(f"{MANIFEST_FILE} is missing a field ({exc}); the kit is damaged") from None

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def wheels(self) -> list[str]:
        return [f.path for f in self.files if f.path.startswith(f"{WHEELHOUSE}/") and f.path.endswith(".whl")]

    @property
    def has_bundle(self) -> bool:
        return any(f.path.startswith(f"{BUNDLE_DIR}/") for f in self.files)


def _listed_files(root: Path) -> set[str]:
    found = set()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in _UNLISTED:
                found.add(rel)
    return found


def verify_kit(root: Path, expected_key: str | None = None) -> tuple[KitManifest, str]:
    """Check a kit completely; returns its manifest and the signing key's fingerprint.

    ``expected_key`` is the fingerprint the hub operator gave the clinic (printed by
    ``fedclinic-hub installer build``); without it the kit is only as trustworthy as the way it travelled.
    Raises KitError saying which file is wrong; nothing else is touched.
    """
    try:
        signed = (root / MANIFEST_FILE).read_bytes()
        signature = (root / SIGNATURE_FILE).read_bytes()
        pem = (root / PUBLIC_KEY_FILE).read_bytes()
    except OSError as exc:
        raise KitError(
            f"{root} is not a complete kit ({Path(exc.filename or '?').name} is missing); copy the whole kit "
            "folder again"
        ) from None
    raw = raw_public_key(pem)
    fp = key_fingerprint(raw)
    if expected_key is not None and fp != expected_key.strip().lower():
        raise KitError(
            f"the kit is signed by key {fp}, not by {expected_key}, the key the hub operator named; "
            "do not install it, ask the hub operator"
        )
    if not ed25519.verify(raw, signed, signature):
        raise KitError(
            f"{MANIFEST_FILE} does not match its signature: the kit was altered; do not install it"
        )
    try:
        manifest = KitManifest.from_json(json.loads(signed))
    except ValueError as exc:
        raise KitError(f"{MANIFEST_FILE} is not JSON ({exc}); the kit is damaged") from None
    if manifest.canonical_bytes() != signed:
        raise KitError(
            f"{MANIFEST_FILE} is signed but not in canonical form; the kit was not built by fedclinic"
        )
    listed = {f.path for f in manifest.files}
    extra = sorted(_listed_files(root) - listed)
    if extra:
        raise KitError(f"the kit holds files it does not list: {', '.join(extra[:5])}; it was altered")
    for entry in manifest.files:
        path = root / entry.path
        if ".." in Path(entry.path).parts or Path(entry.path).is_absolute():
            raise KitError(f"{MANIFEST_FILE} lists an unsafe path {entry.path!r}")
        if not path.is_file():
            raise KitError(f"{entry.path} is missing from the kit; copy the whole kit folder again")
        if path.stat().st_size != entry.size or file_digest(path) != entry.sha256:
            raise KitError(
                f"{entry.path} was altered (its sha256 does not match {MANIFEST_FILE}); "
                "do not install this kit, ask the hub operator for a new one"
            )
    return manifest, fp
