"""A signed bundle with a new input envelope: the same model files, a new version, a new signature.

An envelope says which images a node should trust the model on. It can need changing without the model
changing: a threshold set too tight for a federation's clinics, or an envelope refitted on more validation
images. Exporting again from the checkpoint would rebuild the ONNX files (and their hashes) for nothing;
this copies a verified bundle's files byte for byte and signs a manifest that differs in the envelope, the
version and, when given, the federation round. Nodes refuse a bundle that goes back in version, so the new
version must be above the source's; they refuse an envelope whose dimension is not the head's embedding
dimension, so such an envelope is refused here, before anything is written.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from edge_node.protocol.bundle import VerifiedBundle, verify_bundle
from edge_node.protocol.errors import BundleError
from edge_node.protocol.manifest import InputEnvelope, Manifest, Provenance
from edge_node.protocol.publication import version_key
from export.bundle_writer import BundleFile, write_bundle
from export.errors import ExportError
from export.semver import SEMVER, check_semver

__all__ = ["rebundle_with_envelope"]

#: Provenance metrics measured against the source's envelope (``test_outside_envelope_fp32``,
#: ``test_outside_intensity``, ...): they do not describe the new one and are left out.
_ENVELOPE_METRICS = re.compile(r".+_outside_(?:intensity|envelope_[0-9a-z]+)")

_Precedence = tuple[int, int, int, bool, tuple[tuple[int, int, str], ...]]


def _precedence(version: str) -> _Precedence:
    """A sort key in semver 2.0.0 precedence: a pre-release sorts below its release, numeric identifiers
    below alphanumeric ones and by value, build metadata is ignored."""
    match = SEMVER.fullmatch(check_semver(version))
    assert match is not None
    major, minor, patch, prerelease = int(match[1]), int(match[2]), int(match[3]), match[4]
    parts = prerelease.split(".") if prerelease else []
    identifiers = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts)
    return major, minor, patch, prerelease is None, identifiers


def _check_forward(source_version: str, model_version: str) -> None:
    try:
        source_key = _precedence(source_version)
    except ExportError as exc:
        raise ExportError(
            f"the source bundle's version {source_version!r} is not a semantic version, so no version can "
            "be shown to come after it; export the model again instead"
        ) from exc
    if _precedence(model_version) <= source_key:
        raise ExportError(
            f"model version {model_version} is not above the source bundle's {source_version}: nodes only "
            "move forward (they refuse a lower version unless it is an explicit rollback); choose a version "
            f"after {source_version}"
        )
    if version_key(model_version) < version_key(source_version):
        raise ExportError(
            f"nodes compare versions part by part and would take {model_version} for older than "
            f"{source_version}, and refuse it; choose a version above it both ways (the next patch version)"
        )


def _check_envelope(envelope: InputEnvelope, source: Manifest) -> None:
    head = source.head
    if head is None:
        raise ExportError(
            f"the source bundle {source.model_id} {source.model_version} has no head (no embedding output): "
            "an input envelope is over the head's embedding, so this bundle cannot carry one; export the "
            "model again with the embedding output"
        )
    if envelope.dim != head.embedding_dim:
        raise ExportError(
            f"the envelope is {envelope.dim}-dimensional but the model's embedding "
            f"({head.embedding_output!r}) has {head.embedding_dim} dimensions: a node would refuse it; fit "
            "the envelope on this model's embeddings"
        )


def _provenance(source: Provenance, federation: str | None, round_number: int | None) -> Provenance:
    update: dict[str, object] = {
        "metrics": {k: v for k, v in source.metrics.items() if not _ENVELOPE_METRICS.fullmatch(k)}
    }
    if federation is not None:
        update["federation"] = federation
    if round_number is not None:
        update["round"] = round_number
    return source.model_copy(update=update)


def _write(
    verified: VerifiedBundle,
    out_dir: Path,
    *,
    envelope: InputEnvelope,
    model_version: str,
    private_key: Ed25519PrivateKey,
    federation: str | None,
    round_number: int | None,
) -> Manifest:
    source = verified.manifest
    files = [
        BundleFile(source=verified.path_of(entry), name=entry.path, role=entry.role, variant=entry.variant)
        for entry in source.files
    ]
    try:
        manifest = write_bundle(
            out_dir,
            files,
            model_id=source.model_id,
            model_version=model_version,
            task=source.task,
            io=source.io,
            preprocessing=source.preprocessing,
            provenance=_provenance(source.provenance, federation, round_number),
            producer=source.producer,
            private_key=private_key,
            description=source.description,
            engines=source.engines,
            head=source.head,
            envelope=envelope,
        )
    except ValidationError as exc:
        raise ExportError(f"the envelope does not fit the source bundle's manifest: {exc}") from exc
    if manifest.files != source.files:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise ExportError(
            f"the files of {verified.root} changed while they were copied (their hashes no longer match the "
            "verified manifest); nothing was kept: run again on a bundle nothing else is writing to"
        )
    return manifest


def rebundle_with_envelope(
    source: Path,
    out_dir: Path,
    *,
    envelope: InputEnvelope,
    model_version: str,
    private_key: Ed25519PrivateKey,
    trusted_keys: Sequence[Ed25519PublicKey],
    federation: str | None = None,
    round_number: int | None = None,
) -> Manifest:
    """Write ``out_dir``: the verified bundle ``source`` (a directory or zip) with ``envelope`` as its input
    envelope, as ``model_version``, signed with ``private_key``; returns the new manifest.

    ``source`` is verified with the edge's own ``verify_bundle`` and ``trusted_keys`` before anything is
    copied, and is never written to. The new manifest keeps the source's model id, description, task, io,
    preprocessing, head, engines and files (same names, roles and variants; the bytes, and so the hashes, are
    the source's: checked after the copy). It also keeps the source's producer: the ONNX files are the ones
    that toolchain (its torch, onnx and opset) exported, and a fresh ``producer_info`` would claim the
    running one had made them. The provenance is the source's, ``created_at`` included (it dates the weights,
    which are unchanged), with ``federation`` and ``round`` replaced when given and without the metrics
    measured against the source's envelope (``test_outside_envelope_fp32`` and the like), which say
    nothing about the new one.

    ExportError when ``model_version`` is not a semantic version strictly above the source's, when the
    source does not verify, when it has no head or ``envelope`` is not of its embedding dimension (or
    otherwise does not validate with it), or when ``out_dir`` exists; ``out_dir`` is then left as it was.
    """
    check_semver(model_version)
    if out_dir.exists():
        raise ExportError(f"{out_dir} already exists; bundles are immutable, choose a new output or version")
    with tempfile.TemporaryDirectory(prefix="fedclinic-rebundle-") as tmp:
        try:
            verified = verify_bundle(source, trusted_keys, extract_to=Path(tmp) / "source")
        except BundleError as exc:
            raise ExportError(
                f"the source bundle {source} does not verify, so nothing of it is copied: {exc}"
            ) from exc
        _check_forward(verified.manifest.model_version, model_version)
        _check_envelope(envelope, verified.manifest)
        return _write(
            verified,
            out_dir,
            envelope=envelope,
            model_version=model_version,
            private_key=private_key,
            federation=federation,
            round_number=round_number,
        )
