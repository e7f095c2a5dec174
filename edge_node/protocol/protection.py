"""What a task asks of a node's protection: clip norm, (ε, δ) per round, compression, secure aggregation."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_node.protocol.compression import (
    Compressor,
    Fp16Compressor,
    Int8Compressor,
    TopKCompressor,
    TopKInt8Compressor,
)
from edge_node.protocol.updates import UpdateKind

__all__ = ["CompressionKind", "ProtectionSpec"]


class CompressionKind(str, Enum):
    """How a plain (unmasked) update is compressed; masked updates use the ring encoding instead."""

    NONE = "none"
    TOPK = "topk"
    INT8 = "int8"
    FP16 = "fp16"
    TOPK_INT8 = "topk_int8"  # top-k with delta-coded indices and 8-bit values


class ProtectionSpec(BaseModel):
    """The protection a hub states for one round of a task; the node checks it against its floor.

    ``epsilon`` is per round at ``delta``; a node calibrates its Gaussian noise to it for updates clipped
    to ``clip_norm`` (L2). ``sampling_rate`` < 1 says the learner Poisson-samples its records, which the
    accountant turns into amplification. ``cohort_size`` is how many nodes the hub asked this round.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: UpdateKind = UpdateKind.WEIGHTS_DELTA
    cohort_size: int = Field(ge=1)
    clip_norm: float | None = Field(default=None, gt=0)
    epsilon: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    sampling_rate: float = Field(default=1.0, gt=0, le=1)
    compression: CompressionKind = CompressionKind.NONE
    topk_fraction: float = Field(default=0.01, gt=0, le=1)
    secure_aggregation: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ProtectionSpec:
        if self.epsilon is not None and self.clip_norm is None:
            raise ValueError("a stated epsilon needs a clip_norm: noise is calibrated to the clipped norm")
        if self.secure_aggregation and self.compression is not CompressionKind.NONE:
            raise ValueError(
                "secure aggregation sums masked vectors in a ring, which per-node top-k indices or "
                "quantisation scales would break: use compression 'none' (the ring encoding is the codec)"
            )
        if self.secure_aggregation and self.clip_norm is None:
            raise ValueError("secure aggregation needs a clip_norm: it bounds the fixed-point range")
        return self

    def compressor(self) -> Compressor | None:
        """The codec of a plain update, or None for dense float tensors."""
        if self.compression is CompressionKind.TOPK:
            return TopKCompressor(self.topk_fraction)
        if self.compression is CompressionKind.TOPK_INT8:
            return TopKInt8Compressor(self.topk_fraction)
        if self.compression is CompressionKind.INT8:
            return Int8Compressor()
        if self.compression is CompressionKind.FP16:
            return Fp16Compressor()
        return None
