"""ProtectionPipeline: clip → noise → compress → mask, the order in which an update is made fit to leave.

The pipeline is the node's; one instance lives as long as the node's federation so that the error-feedback
residual of compression carries from round to round (what top-k or quantisation dropped is sent later,
never lost). The round's ``ProtectionSpec`` comes with each call: the hub states it, the clinic's floor
has already accepted it. Noise is calibrated from the stated (ε, δ) through the shared accountant, so the
ledger charges exactly what was released; under secure aggregation with a threshold t (``noise_shares``)
each node adds a 1/t share of the variance and the ledger charges the sum's ε (distributed DP: only the
sum of at least t masked updates is ever unmasked). Compression keeps its error-feedback residual in a
``ResidualStore`` when one is given (the node's data directory). The mask step is a callable given by the
caller (the secure aggregation client of this round), because it needs the round's key agreement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edge_node.protection.errors import ProtectionError
from edge_node.protection.mechanism import add_gaussian_noise, clip_l2
from edge_node.protection.residual import ResidualStore
from edge_node.protocol.accountant import noise_multiplier_for
from edge_node.protocol.compression import ErrorFeedback
from edge_node.protocol.protection import CompressionKind, ProtectionSpec
from edge_node.protocol.tensors import Tensors, encode_tensors

__all__ = ["Masker", "ProtectedUpdate", "ProtectionPipeline"]

logger = logging.getLogger(__name__)

#: The mask step: dense protected update -> masked wire tensors (a secure-aggregation client's ``mask``).
Masker = Callable[[Mapping[str, np.ndarray]], Tensors]


@dataclass(frozen=True)
class ProtectedUpdate:
    """What leaves the clinic for one round, and what it cost."""

    wire: Tensors  # the tensors as they travel (compressed or masked)
    payload: bytes  # their npz encoding: the bytes on the wire
    norm: float  # L2 norm of the update before clipping (stays at the node)
    clipped: bool
    noise_multiplier: float | None  # None: no noise was added; else σ of the release (the sum's, if split)
    epsilon: float | None  # this round's ε at the spec's δ
    #: Nodes over which the noise variance was split (1: this update carries all of it).
    noise_shares: int = 1

    @property
    def payload_bytes(self) -> int:
        """Bytes on the wire, measured from the encoded payload."""
        return len(self.payload)


class ProtectionPipeline:
    """Clip (L2) → Gaussian noise for the stated (ε, δ) → compress with error feedback → mask."""

    def __init__(
        self, *, rng: np.random.Generator | None = None, residuals: ResidualStore | None = None
    ) -> None:
        # A fresh generator seeded from the OS; a test passes its own to reproduce the noise.
        self._rng = rng if rng is not None else np.random.default_rng()
        #: Where error-feedback residuals persist across restarts (None: in memory only, as in simulation).
        self.residuals = residuals
        self._feedback: dict[tuple[CompressionKind, float], ErrorFeedback] = {}
        self._sigmas: dict[tuple[float, float, float], float] = {}

    def noise_multiplier(self, spec: ProtectionSpec) -> float | None:
        """σ that makes one release under this spec (ε, δ)-DP; None when the spec states no ε."""
        if spec.epsilon is None:
            return None
        key = (spec.epsilon, spec.delta, spec.sampling_rate)
        if key not in self._sigmas:
            self._sigmas[key] = noise_multiplier_for(
                spec.epsilon, spec.delta, sampling_rate=spec.sampling_rate
            )
        return self._sigmas[key]

    def _feedback_for(self, spec: ProtectionSpec) -> ErrorFeedback:
        key = (spec.compression, spec.topk_fraction)
        feedback = self._feedback.get(key)
        if feedback is None:
            compressor = spec.compressor()
            assert compressor is not None  # called only for a compressed spec
            feedback = ErrorFeedback(compressor)
            if self.residuals is not None:
                feedback.residual = self.residuals.load(spec.compression, spec.topk_fraction)
            self._feedback[key] = feedback
        return feedback

    def _compress_with_feedback(self, tensors: Tensors, spec: ProtectionSpec) -> Tensors:
        feedback = self._feedback_for(spec)
        wire = feedback.compress(tensors)
        if self.residuals is not None:
            self.residuals.save(spec.compression, spec.topk_fraction, feedback.residual)
        return wire

    def protect(
        self, update: Mapping[str, np.ndarray], spec: ProtectionSpec, *, masker: Masker | None = None
    ) -> ProtectedUpdate:
        """The update as it may leave under ``spec``; a masked spec needs this round's ``masker``."""
        if spec.secure_aggregation and masker is None:
            raise ProtectionError("this round is under secure aggregation: pass the round's masker")
        tensors: Tensors = {name: np.asarray(arr) for name, arr in update.items()}
        norm, clipped = 0.0, False
        if spec.clip_norm is not None:
            try:
                tensors, norm = clip_l2(tensors, spec.clip_norm)
            except ValueError as exc:
                raise ProtectionError(str(exc)) from exc
            clipped = norm > spec.clip_norm
        sigma = self.noise_multiplier(spec)
        if sigma is not None:
            assert spec.clip_norm is not None  # the spec's validator guarantees it
            # Under secure aggregation with threshold t, t nodes' shares of variance σ²C²/t make the
            # smallest sum's σ²C²: ε is the sum's, the only release anyone sees.
            std = sigma * spec.clip_norm / math.sqrt(spec.noise_shares)
            tensors = add_gaussian_noise(tensors, std, self._rng)
        if spec.compression is not CompressionKind.NONE:
            tensors = self._compress_with_feedback(tensors, spec)
        if masker is not None and spec.secure_aggregation:
            tensors = masker(tensors)
        payload = encode_tensors(tensors)
        logger.debug("protected update: %d bytes, clipped=%s, sigma=%s", len(payload), clipped, sigma)
        return ProtectedUpdate(
            tensors, payload, norm, clipped, sigma, spec.epsilon if sigma else None, spec.noise_shares
        )
