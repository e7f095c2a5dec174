"""Bundle verification: the only way from a bundle directory or zip to a model an edge may load.

Checks, in this order, each failure with its own error and a message that says what to do:

1. a zip is extracted safely (no absolute paths, no ``..``, no links, bounded size) into a new directory;
2. ``manifest.json`` is present and readable                                   -> SchemaError
3. ``manifest.sig`` is present                                                 -> SignatureError
4. the manifest's schema version is one this edge supports                     -> SchemaError
5. the signature verifies over the canonical manifest bytes with a trusted key -> SignatureError
6. the manifest validates against the schema and is in canonical form          -> SchemaError
7. every listed file has a safe relative path, exists, and matches size and sha256
   (engines must be listed among the files)                                    -> IntegrityError
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_node.protocol.errors import BundleError, IntegrityError, SchemaError, SignatureError
from edge_node.protocol.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    SIGNATURE_FILE,
    EngineEntry,
    FileEntry,
    Manifest,
    canonical_json,
    load_manifest_dict,
    validate_manifest,
)
from edge_node.protocol.signing import find_signer, fingerprint

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "MAX_ZIP_BYTES",
    "MAX_ZIP_MEMBERS",
    "VerifiedBundle",
    "extract_zip",
    "open_no_link",
    "read_bundle_file",
    "safe_relative_path",
    "verify_bundle",
]

logger = logging.getLogger(__name__)

#: A zip bundle may hold at most this many uncompressed bytes and members (zip-bomb guard).
MAX_ZIP_BYTES = 8 * 1024**3
MAX_ZIP_MEMBERS = 1000
#: An Ed25519 signature is 64 bytes; a larger signature file is read only this far.
MAX_SIGNATURE_BYTES = 4096
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, schema and file hashes were checked by ``verify_bundle``."""

    root: Path
    manifest: Manifest
    #: Fingerprint of the trusted key that signed it (safe to log).
    key_fingerprint: str

    def path_of(self, entry: FileEntry | EngineEntry | str) -> Path:
        """Absolute path of a file listed in the manifest (a FileEntry, EngineEntry or its path string)."""
        rel = entry if isinstance(entry, str) else entry.path
        if rel not in {f.path for f in self.manifest.files}:
            raise IntegrityError(f"{rel!r} is not a file of this bundle's manifest")
        return self.root / safe_relative_path(rel)

    @property
    def model_path(self) -> Path:
        """The fp32 ONNX model (the file with role ``model``)."""
        return self.path_of(next(f for f in self.manifest.files if f.role == "model"))

    def variant_path(self, variant: str) -> Path | None:
        """The path of a variant such as ``"int8"``, or None when this bundle does not ship it."""
        for f in self.manifest.files:
            if f.role == "variant" and f.variant == variant:
                return self.path_of(f)
        return None


def safe_relative_path(path: str) -> PurePosixPath:
    """A manifest or zip path as a relative POSIX path that stays inside the bundle, else IntegrityError."""
    p = PurePosixPath(path)
    unsafe = (
        not path
        or "\\" in path
        or "\x00" in path
        or ":" in path
        or p.is_absolute()
        or any(part in ("", ".", "..") for part in path.rstrip("/").split("/"))
    )
    if unsafe:
        raise IntegrityError(
            f"bundle path {path!r} is unsafe (absolute, '..', or not a plain relative path); "
            "refusing the bundle: it was not written by fedclinic export"
        )
    return p


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with os.fdopen(open_no_link(path), "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def open_no_link(path: Path) -> int:
    """A read-only descriptor of the plain file ``path``; IntegrityError for a link, a loop, a non-file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise IntegrityError(
                f"bundle file {path.name!r} is a link; bundles hold plain files only"
            ) from None
        raise IntegrityError(f"bundle file {path.name!r} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IntegrityError(f"bundle file {path.name!r} is not a regular file")
    return fd


def read_bundle_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of the plain file ``path``, never through a link; nothing past the cap."""
    fd = open_no_link(path)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit)
    return data


def extract_zip(zip_path: Path, dest: Path) -> Path:
    """Extract a zip bundle into the empty directory ``dest``, refusing traversal, links and zip bombs.

    Returns the bundle root: ``dest``, or its single top-level folder when the zip wraps the bundle in one.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(
            f"{zip_path.name} is not a readable zip ({exc}); download the bundle again"
        ) from exc
    with zf:
        members = zf.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise IntegrityError(f"{zip_path.name} has {len(members)} members (limit {MAX_ZIP_MEMBERS})")
        names = [m.filename.rstrip("/") for m in members]
        if len(set(names)) != len(names):
            raise IntegrityError(f"{zip_path.name} holds a member twice; refusing an ambiguous bundle")
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise IntegrityError(f"{zip_path.name} would extract to more than {MAX_ZIP_BYTES} bytes")
        dest.mkdir(parents=True, exist_ok=True)
        written = 0
        for member in members:
            rel = safe_relative_path(member.filename)
            mode = member.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise IntegrityError(
                    f"{zip_path.name} contains a link {member.filename!r}; refusing the bundle"
                )
            target = dest.joinpath(*rel.parts)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, target.open("xb") as out:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > MAX_ZIP_BYTES:
                        raise IntegrityError(f"{zip_path.name} extracts to more than {MAX_ZIP_BYTES} bytes")
                    out.write(chunk)
    if not (dest / MANIFEST_FILE).exists():
        children = list(dest.iterdir())
        if len(children) == 1 and children[0].is_dir():
            return children[0]
    return dest


def verify_bundle(
    bundle_dir: Path, trusted_keys: Sequence[Ed25519PublicKey], *, extract_to: Path | None = None
) -> VerifiedBundle:
    """Verify a bundle directory (or ``.zip``) against the trusted hub keys; raise a BundleError if anything
    is off. A zip is extracted into ``extract_to`` (an empty or new directory), else into a new temporary
    directory that the caller owns (``VerifiedBundle.root``)."""
    if bundle_dir.is_file() and zipfile.is_zipfile(bundle_dir):
        dest = extract_to if extract_to is not None else Path(tempfile.mkdtemp(prefix="fedclinic-bundle-"))
        root = extract_zip(bundle_dir, dest)
    elif bundle_dir.is_dir():
        root = bundle_dir
    else:
        raise BundleError(f"{bundle_dir} is neither a bundle directory nor a zip; check the path")
    root = root.resolve()

    manifest_path, sig_path = root / MANIFEST_FILE, root / SIGNATURE_FILE
    if not manifest_path.is_file() and not manifest_path.is_symlink():
        raise SchemaError(f"{bundle_dir} has no {MANIFEST_FILE}; this is not a model bundle")
    if not sig_path.is_file() and not sig_path.is_symlink():
        raise SignatureError(
            f"{bundle_dir} has no {SIGNATURE_FILE}: the bundle is unsigned and cannot be trusted; "
            "ask the hub operator for a signed bundle (`fedclinic-hub export --key ...`)"
        )
    data = load_manifest_dict(read_bundle_file(manifest_path, MAX_MANIFEST_BYTES + 1))

    if not trusted_keys:
        raise SignatureError("no trusted hub keys are configured on this node; install the hub's hub.pub")
    signed = canonical_json(data)
    signer = find_signer(trusted_keys, signed, read_bundle_file(sig_path, MAX_SIGNATURE_BYTES))
    if signer is None:
        trusted = ", ".join(fingerprint(k) for k in trusted_keys)
        raise SignatureError(
            f"the signature of {bundle_dir.name} does not verify with any trusted key ({trusted}): the "
            "manifest was altered or signed by another key; refusing it and keeping the current model"
        )

    manifest = validate_manifest(data)
    if manifest.canonical_bytes() != signed:
        raise SchemaError(
            "manifest.json is signed but not in canonical form (fields missing or not normalised); "
            "re-export the bundle with fedclinic"
        )
    _check_files(root, manifest)
    key_fp = fingerprint(signer)
    logger.info("bundle %s %s verified (key %s)", manifest.model_id, manifest.model_version, key_fp)
    return VerifiedBundle(root=root, manifest=manifest, key_fingerprint=key_fp)


def _check_files(root: Path, manifest: Manifest) -> None:
    paths = [f.path for f in manifest.files]
    if len(set(paths)) != len(paths):
        raise IntegrityError("the manifest lists a file twice; re-export the bundle")
    if not any(f.role == "model" for f in manifest.files):
        raise IntegrityError("the manifest lists no file with role 'model'; re-export the bundle")
    for engine in manifest.engines:
        if engine.path not in paths:
            raise IntegrityError(f"engine {engine.path!r} is not listed among the files with a sha256")
    for entry in manifest.files:
        path = root.joinpath(*safe_relative_path(entry.path).parts)
        try:
            inside = path.resolve().is_relative_to(root)
        except (OSError, RuntimeError):  # a symlink loop
            raise IntegrityError(f"bundle file {entry.path!r} is a link loop; refusing it") from None
        if not inside:
            raise IntegrityError(
                f"bundle file {entry.path!r} resolves outside the bundle (a link?); refusing it"
            )
        if path.is_symlink():
            raise IntegrityError(f"bundle file {entry.path!r} is a link; bundles hold plain files only")
        if not path.is_file():
            raise IntegrityError(f"bundle file {entry.path!r} is missing; download the bundle again")
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(
                f"bundle file {entry.path!r} has {size} bytes, the manifest says {entry.size}: "
                "it is damaged or was altered; download the bundle again"
            )
        if _sha256(path) != entry.sha256:
            raise IntegrityError(
                f"bundle file {entry.path!r} does not match its sha256 in the signed manifest: "
                "it is damaged or was altered; download the bundle again"
            )
