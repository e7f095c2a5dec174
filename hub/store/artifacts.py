"""Tensor artifacts in the store: round inputs, task tensors and results as npz rows, deduplicated."""

from __future__ import annotations

import hashlib

from sqlalchemy.orm import Session

from edge_node.protocol.tensors import Tensors, decode_tensors, encode_tensors
from hub.service.errors import NotFoundError
from hub.store.schema import Artifact, utcnow

__all__ = ["load_tensors", "store_tensors"]


def store_tensors(session: Session, params: Tensors, note: str | None = None) -> str:
    """Keep npz tensors in the database (deduplicated by sha256); returns the artifact id."""
    payload = encode_tensors(params, compress=False)
    sha = hashlib.sha256(payload).hexdigest()
    artifact_id = "t-" + sha[:40]
    if session.get(Artifact, artifact_id) is None:
        session.add(
            Artifact(
                id=artifact_id,
                kind="tensors",
                sha256=sha,
                size=len(payload),
                data=payload,
                path=None,
                model_id=None,
                model_version=None,
                note=note,
                created_at=utcnow(),
            )
        )
        session.flush()
    return artifact_id


def load_tensors(session: Session, artifact_id: str) -> Tensors:
    artifact = session.get(Artifact, artifact_id)
    if artifact is None or artifact.kind != "tensors" or artifact.data is None:
        raise NotFoundError(f"no tensor artifact {artifact_id!r}; see `fedclinic-hub models list`")
    return decode_tensors(artifact.data)
