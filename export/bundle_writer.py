"""Write a signed model bundle: model files, manifest.json (pretty), manifest.sig (over canonical bytes)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_node.protocol.durable_file import fsync_directory, fsync_file, replace_durably
from edge_node.protocol.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    EngineEntry,
    FileEntry,
    HeadSpec,
    InputEnvelope,
    IOSpec,
    Manifest,
    Preprocessing,
    Producer,
    Provenance,
    TaskSpec,
)
from export.errors import ExportError
from export.signing import sign_manifest

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BundleFile:
    """A file to place in the bundle under ``name`` (a plain file name, no folders)."""

    source: Path
    name: str
    role: Literal["model", "variant", "engine", "other"] = "model"
    variant: str | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def git_revision(repo: Path = _REPO_ROOT) -> str | None:
    """HEAD's commit (with ``+dirty`` when tracked files changed), or None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def producer_info(opset: int) -> Producer:
    return Producer(
        fedclinic_version=_version("fedclinic") or "0.0.0",
        git_revision=git_revision(),
        torch_version=_version("torch"),
        onnx_version=_version("onnx"),
        onnxruntime_version=_version("onnxruntime"),
        opset=opset,
    )


def write_bundle(
    out_dir: Path,
    files: Sequence[BundleFile],
    *,
    model_id: str,
    model_version: str,
    task: TaskSpec,
    io: IOSpec,
    preprocessing: Preprocessing,
    provenance: Provenance,
    producer: Producer,
    private_key: Ed25519PrivateKey,
    description: str = "",
    engines: Sequence[EngineEntry] = (),
    head: HeadSpec | None = None,
    envelope: InputEnvelope | None = None,
) -> Manifest:
    """Copy ``files`` into a new bundle directory ``out_dir``, hash them, write and sign the manifest.

    The bundle is assembled in a temporary sibling directory and renamed into place, so ``out_dir`` either
    does not exist or holds a complete signed bundle. An existing ``out_dir`` is refused: published versions
    are immutable; export a new ``--model-version`` instead.
    """
    if out_dir.exists():
        raise ExportError(f"{out_dir} already exists; bundles are immutable, choose a new output or version")
    names = [f.name for f in files]
    if len(set(names)) != len(names) or any("/" in n or n in (MANIFEST_FILE, SIGNATURE_FILE) for n in names):
        raise ExportError(f"bundle file names must be unique plain names, got {names}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        entries = []
        for f in files:
            dest = staging / f.name
            shutil.copyfile(f.source, dest)
            entries.append(
                FileEntry(
                    path=f.name,
                    sha256=sha256_file(dest),
                    size=dest.stat().st_size,
                    role=f.role,
                    variant=f.variant,
                )
            )
        manifest = Manifest(
            model_id=model_id,
            model_version=model_version,
            description=description,
            task=task,
            io=io,
            preprocessing=preprocessing,
            files=entries,
            engines=list(engines),
            producer=producer,
            provenance=provenance,
            head=head,
            envelope=envelope,
        )
        # Pretty for people; the signature covers the canonical bytes, which the edge recomputes.
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (staging / SIGNATURE_FILE).write_bytes(sign_manifest(manifest, private_key))
        for path in staging.iterdir():
            fsync_file(path)
        fsync_directory(staging)
        os.chmod(staging, 0o755)
        replace_durably(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote bundle %s %s (%d files)", model_id, model_version, len(entries))
    return manifest


def zip_bundle(bundle_dir: Path, zip_path: Path) -> Path:
    """Pack a bundle directory into a zip (files at the zip's top level), e.g. for download."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(bundle_dir.iterdir()):
            if path.is_file():
                zf.write(path, arcname=path.name)
    return zip_path
