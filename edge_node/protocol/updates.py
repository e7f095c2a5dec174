"""Wire models for what a node uploads in a round (the tensors travel as npz beside the envelope)."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class UpdateKind(str, Enum):
    """What a round asks a node to compute: a weights delta, a head delta, public logits, statistics, the
    sums and distance counts that fit a bundle's input envelope on the nodes' images, or the tensors a
    strategy left at each node (FedBN's normalisation tensors) so that its model can be deployed."""

    WEIGHTS_DELTA = "weights_delta"
    HEAD_DELTA = "head_delta"
    PUBLIC_LOGITS = "public_logits"
    STATS = "stats"
    ENVELOPE_MOMENTS = "envelope_moments"
    ENVELOPE_DISTANCES = "envelope_distances"
    KEPT_TENSORS = "kept_tensors"


class UpdateEnvelope(BaseModel):
    """Metadata of one node's update; ``tensors`` is the npz payload's SHA-256 and size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node_id: str
    round: int
    kind: UpdateKind
    num_examples: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    payload_sha256: str
    payload_bytes: int = Field(ge=0)
