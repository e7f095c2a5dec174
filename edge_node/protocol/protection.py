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

__all__ = ["CompressionKind", "ProtectionSpec", "compressor_for", "secagg_threshold"]


class CompressionKind(str, Enum):
    """How a plain (unmasked) update is compressed; masked updates use the ring encoding instead."""

    NONE = "none"
    TOPK = "topk"
    INT8 = "int8"
    FP16 = "fp16"
    TOPK_INT8 = "topk_int8"  # top-k with delta-coded indices and 8-bit values


def compressor_for(kind: CompressionKind, topk_fraction: float = 0.01) -> Compressor | None:
    """The codec of a plain update compressed as ``kind``; None for dense float tensors."""
    if kind is CompressionKind.TOPK:
        return TopKCompressor(topk_fraction)
    if kind is CompressionKind.TOPK_INT8:
        return TopKInt8Compressor(topk_fraction)
    if kind is CompressionKind.INT8:
        return Int8Compressor()
    if kind is CompressionKind.FP16:
        return Fp16Compressor()
    return None


def secagg_threshold(stated: int | None, cohort: int) -> int:
    """Secure aggregation's t: the stated one, else the smallest strict two-thirds majority of the cohort
    (at least 2). Hub and nodes both derive it, so a node knows it from its task."""
    if stated is not None:
        return stated
    return min(cohort, max(2, (2 * cohort) // 3 + 1))


class ProtectionSpec(BaseModel):
    """The protection a hub states for one round of a task; the node checks it against its floor.

    ``epsilon`` is per round at ``delta``; a node calibrates its Gaussian noise to it for updates clipped
    to ``clip_norm`` (L2). ``sampling_rate`` < 1 says the learner Poisson-samples its records, which the
    accountant turns into amplification. ``cohort_size`` is how many nodes the hub asked this round.

    ``secagg_threshold`` (t, secure aggregation only) is the fewest masked inputs the protocol unmasks: a
    sum the hub can learn holds at least t updates. Each node then adds only a 1/t share of the noise
    variance (distributed DP): the t shares in the smallest possible sum add up to the full σ²·C² the
    stated ε needs, and only that sum is ever seen, since the masks hide every single update.
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
    secagg_threshold: int | None = Field(default=None, ge=1)

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
        if self.secagg_threshold is not None:
            if not self.secure_aggregation:
                raise ValueError(
                    "secagg_threshold is the secure-aggregation threshold: it needs secure aggregation"
                )
            if self.secagg_threshold > self.cohort_size:
                raise ValueError(
                    f"secagg_threshold {self.secagg_threshold} exceeds the round's {self.cohort_size} nodes"
                )
        return self

    @property
    def unmask_threshold(self) -> int:
        """The round's secure-aggregation threshold t (``secagg_threshold``, derived if not stated)."""
        return secagg_threshold(self.secagg_threshold, self.cohort_size)

    @property
    def noise_shares(self) -> int:
        """Over how many nodes the sum's noise variance is split (1: each node adds all of it)."""
        if self.secure_aggregation and self.secagg_threshold is not None:
            return self.secagg_threshold
        return 1

    def compressor(self) -> Compressor | None:
        """The codec of a plain update, or None for dense float tensors."""
        return compressor_for(self.compression, self.topk_fraction)
