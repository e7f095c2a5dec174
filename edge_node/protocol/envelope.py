"""The input envelope's distance: the exporter sets its threshold with it, the node applies it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_node.protocol.manifest import InputEnvelope

__all__ = ["DRIFT_ALARM_P", "DRIFT_TOLERANCE", "EnvelopeCheck", "binomial_tail", "drift_alarm"]

#: A count of images outside the envelope whose binomial tail is below this is more than chance.
DRIFT_ALARM_P = 0.001
#: The drift alarm tolerates this many times the chance rate (1 − quantile): a clinic whose own images sit
#: at the edge of the validation set's (a few per cent outside) is not drifting; docs/envelope.md says how
#: this was chosen.
DRIFT_TOLERANCE = 5.0


@dataclass(frozen=True)
class EnvelopeCheck:
    """The manifest's envelope as arrays, ready to score embeddings (built once per loaded model)."""

    mean: np.ndarray  # (D,)
    whitening: np.ndarray  # (D, D)
    threshold: float

    @classmethod
    def of(cls, envelope: InputEnvelope) -> EnvelopeCheck:
        return cls(
            mean=np.asarray(envelope.mean, dtype=np.float64),
            whitening=np.asarray(envelope.whitening, dtype=np.float64),
            threshold=float(envelope.threshold),
        )

    def distances(self, embedding: np.ndarray) -> np.ndarray:
        """(N, D) embeddings → (N,) squared Mahalanobis distances from the envelope's mean."""
        z = (np.asarray(embedding, dtype=np.float64) - self.mean) @ self.whitening.T  # (N, D)
        return np.einsum("nd,nd->n", z, z)

    def outside(self, embedding: np.ndarray) -> np.ndarray:
        """(N, D) embeddings → (N,) bool: farther than the threshold (a non-finite distance is outside)."""
        return self.judge(embedding)[0]

    def judge(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) embeddings → (outside (N,) bool, each distance over the threshold (N,)), from one pass."""
        d = self.distances(embedding)
        # A degenerate envelope's tiny threshold gives an infinite ratio: outside, and no warning.
        with np.errstate(over="ignore"):
            ratio = d / self.threshold
        return ~(d <= self.threshold), ratio


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p): how surprising ``k`` images outside of ``n`` are when each falls
    outside with probability ``p`` (1 − the envelope's quantile) by chance."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    # Sum the terms in log space from k up: exact enough for n in the thousands, no scipy needed.
    log_terms = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(k, n + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in log_terms))


def drift_alarm(outside: int, n: int, quantile: float) -> bool:
    """Whether ``outside`` of ``n`` recent images is more than a clinic like the validation set shows: the
    count is improbable (p < ``DRIFT_ALARM_P``) even at ``DRIFT_TOLERANCE`` times the chance rate."""
    rate = min(1.0, DRIFT_TOLERANCE * (1.0 - quantile))
    return n > 0 and binomial_tail(outside, n, rate) < DRIFT_ALARM_P
