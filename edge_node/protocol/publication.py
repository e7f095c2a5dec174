"""Signed publication records: which bundle a cohort (or a canary subset) should serve, and until when.

The hub signs ``PublicationRecord`` with its Ed25519 bundle key (the same key that signs manifests). A node
accepts a record only if (``check_publication``): the signature verifies with a trusted key, it has not
expired, its ``seq`` is newer than the last record the node accepted (a replayed old record is refused), it
targets this node, and it does not lower the model version unless the hub signed it as a rollback. After
that, the downloaded archive must have ``bundle_sha256`` and pass ``verify_bundle`` like any bundle.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from edge_node.protocol.errors import PublicationError
from edge_node.protocol.manifest import canonical_json
from edge_node.protocol.signing import find_signer, fingerprint

__all__ = [
    "PublicationRecord",
    "SignedPublication",
    "check_publication",
    "record_bytes",
    "version_key",
]


class PublicationRecord(BaseModel):
    """What the hub publishes; every field is covered by the signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    publication_id: Annotated[str, Field(pattern=r"^[0-9a-f]{8,64}$")]
    #: Strictly increasing over all of the hub's publications: a node never goes back to a lower seq.
    seq: Annotated[int, Field(ge=1)]
    model_id: str
    model_version: str
    #: sha256 (hex) of the bundle zip served at ``/v1/bundles/{publication_id}/archive``.
    bundle_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bundle_bytes: Annotated[int, Field(ge=0)]
    cohort: str
    #: Node ids of a canary publication; empty means every node of the cohort.
    nodes: list[str] = Field(default_factory=list)
    canary_percent: Annotated[float, Field(ge=0, le=100)] = 100.0
    #: True when the hub deliberately sends the cohort back to an earlier model version.
    rollback: bool = False
    issued_at: datetime
    expires_at: datetime

    def targets(self, node_id: str, cohort: str) -> bool:
        return self.cohort == cohort and (not self.nodes or node_id in self.nodes)


class SignedPublication(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    record: PublicationRecord
    #: Standard base64 of the 64-byte Ed25519 signature of ``record_bytes(record)``.
    signature_b64: str
    key_fingerprint: str


def record_bytes(record: PublicationRecord) -> bytes:
    """The exact signed bytes: canonical JSON (sorted keys, no whitespace) of the record."""
    return canonical_json(record.model_dump(mode="json"))


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key for semantic-like versions: numeric parts compare as numbers, others as text."""
    parts = re.split(r"[.+-]", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def check_publication(
    signed: SignedPublication,
    trusted_keys: Sequence[Ed25519PublicKey],
    *,
    node_id: str,
    cohort: str,
    last_seq: int | None,
    current_version: str | None,
    now: datetime | None = None,
) -> PublicationRecord:
    """The record if this node may act on it, else PublicationError saying why (the node keeps its model)."""
    record = signed.record
    try:
        signature = base64.b64decode(signed.signature_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PublicationError("publication signature is not base64; refusing it") from exc
    if not trusted_keys:
        raise PublicationError("no trusted hub key on this node; enroll again or install hub.pub")
    if find_signer(trusted_keys, record_bytes(record), signature) is None:
        trusted = ", ".join(fingerprint(k) for k in trusted_keys)
        raise PublicationError(
            f"publication {record.publication_id} is not signed by a trusted key ({trusted})"
        )
    moment = now or datetime.now(timezone.utc)
    if record.expires_at <= moment:
        raise PublicationError(
            f"publication {record.publication_id} expired at {record.expires_at.isoformat()}"
        )
    if last_seq is not None and record.seq <= last_seq:
        raise PublicationError(
            f"publication {record.publication_id} has seq {record.seq}, not newer than {last_seq}: a replay"
        )
    if not record.targets(node_id, cohort):
        raise PublicationError(f"publication {record.publication_id} is not meant for this node")
    if (
        current_version is not None
        and not record.rollback
        and version_key(record.model_version) < version_key(current_version)
    ):
        raise PublicationError(
            f"publication {record.publication_id} would downgrade {current_version} to "
            f"{record.model_version} without being signed as a rollback"
        )
    return record
