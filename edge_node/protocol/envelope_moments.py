"""The input envelope fitted from sums: what nodes send so that the hub fits the envelope on images it never
sees, and the numbers the exporter's own fit is made of.

A Gaussian envelope with a Ledoit–Wolf shrunk covariance depends on its samples only through five sums:
their count n, Σx, Σxxᵀ, Σ|x|²x and Σ|x|⁴ (the last two give the shrinkage weight, whose estimate needs the
fourth moments of the centred samples; expanding |x − μ|⁴ around any μ leaves only these sums). Sums add
up, so the envelope fitted on the sums of several nodes is the envelope fitted on all their images.

The threshold is the ``quantile`` of cross-fitted distances: each image's distance from the envelope fitted
without its fold. Over the wire that takes two rounds (docs/envelope.md): nodes send the sums of each fold
of their images; the hub sends back, per fold, the envelope fitted on the other folds; each node counts its
images' held-out distances in a fixed histogram, and the hub reads the quantile from the summed
histograms. No sum over fewer than ``MIN_FOLD_IMAGES`` images leaves a node, and no single distance.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_node.protocol.envelope import EnvelopeCheck

__all__ = [
    "HISTOGRAM_BINS",
    "MIN_FOLD_IMAGES",
    "MomentSums",
    "distance_histogram",
    "envelope_fields",
    "fold_sums",
    "folds_of",
    "held_out_checks",
    "histogram_edges",
    "histogram_quantile",
    "ledoit_wolf",
]

#: Each sum a node sends covers at least this many of its images; a node with fewer sends nothing.
MIN_FOLD_IMAGES = 10
#: Bins of the distance histogram, log-spaced over ``D × [10⁻³, 10³]`` (a squared Mahalanobis distance of a
#: D-dimensional sample is about D): each bin is 0.58 % wide, so the threshold read from the summed
#: histograms lies at most that far above the exact quantile. Two more bins count what lies below and above.
HISTOGRAM_BINS = 2400
_SPAN_DECADES = 3.0


#: Relative slack of ``MomentSums.problem``'s checks: float64 sums of float32 features round far below it.
_CONSISTENT = 1e-7


@dataclass(frozen=True)
class MomentSums:
    """The sums of a set of D-dimensional samples that fix their shrunk Gaussian envelope."""

    n: float
    #: (D,) Σ x
    s1: np.ndarray
    #: (D, D) Σ x xᵀ
    s2: np.ndarray
    #: (D,) Σ |x|² x
    s3: np.ndarray
    #: Σ |x|⁴
    s4: float

    @classmethod
    def of(cls, x: np.ndarray) -> MomentSums:
        """(N, D) samples → their sums."""
        e = np.asarray(x, dtype=np.float64)
        sq = np.einsum("nd,nd->n", e, e)  # (N,) |x|²
        return cls(
            n=float(len(e)),
            s1=e.sum(axis=0),
            s2=e.T @ e,
            s3=sq @ e,
            s4=float(np.sum(sq**2)),
        )

    @classmethod
    def zeros(cls, d: int) -> MomentSums:
        return cls(0.0, np.zeros(d), np.zeros((d, d)), np.zeros(d), 0.0)

    @property
    def dim(self) -> int:
        return int(self.s1.shape[0])

    @classmethod
    def total(cls, sums: Sequence[MomentSums]) -> MomentSums:
        """The sums of all the given sets' samples together (at least one set)."""
        return sum(sums[1:], sums[0])

    def __add__(self, other: MomentSums) -> MomentSums:
        return MomentSums(
            self.n + other.n, self.s1 + other.s1, self.s2 + other.s2, self.s3 + other.s3, self.s4 + other.s4
        )

    def __sub__(self, other: MomentSums) -> MomentSums:
        return MomentSums(
            self.n - other.n, self.s1 - other.s1, self.s2 - other.s2, self.s3 - other.s3, self.s4 - other.s4
        )

    def shrunk(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(mean (D,), shrunk covariance (D, D), shrinkage weight in [0, 1]).

        The covariance is ``(1 - a) S + a m I`` with S the sample covariance (divided by n), m its mean
        eigenvalue and ``a`` the weight that minimises the expected squared error (Ledoit and Wolf, 2004).
        """
        if self.n < 2:
            raise ValueError(f"an envelope needs at least 2 samples, got {self.n:g}")
        n, d = self.n, self.dim
        mu = self.s1 / n
        s = self.s2 / n - np.outer(mu, mu)
        s = (s + s.T) / 2.0
        m = float(np.trace(s)) / d
        delta = float(np.sum((s - m * np.eye(d)) ** 2))
        if delta <= 0.0:
            return mu, s, 0.0
        mu2 = float(mu @ mu)
        # Σ |x − μ|⁴ expanded: Σ|x|⁴ − 4 μ·Σ|x|²x + 4 μᵀ(Σxxᵀ)μ + 2 |μ|² Σ|x|² − 3 n |μ|⁴.
        fourth = (
            self.s4
            - 4.0 * float(mu @ self.s3)
            + 4.0 * float(mu @ self.s2 @ mu)
            + 2.0 * mu2 * float(np.trace(self.s2))
            - 3.0 * n * mu2**2
        )
        # Σ_k |x_k x_kᵀ − S|² over centred samples = Σ_k |x_k|⁴ − n |S|².
        beta = (fourth - n * float(np.sum(s**2))) / n**2
        a = min(max(beta, 0.0), delta) / delta
        return mu, (1.0 - a) * s + a * m * np.eye(d), a

    def problem(self) -> str | None:
        """Why these cannot be the sums of ``n`` real samples, or None. What any set of samples satisfies:
        Σxxᵀ symmetric with a centred part Σxxᵀ − ΣxΣxᵀ/n that is positive semi-definite;
        Σ|x|⁴ ≥ (Σ|x|²)²/n and (Σ|x|²x_j)² ≤ Σ|x|⁴ Σx_j² (Cauchy–Schwarz); no sum at all over 0 samples.
        Checked to a relative ``_CONSISTENT`` of each sum's scale, so rounding never refuses real sums."""
        if self.n == 0:
            nothing = not (np.any(self.s1) or np.any(self.s2) or np.any(self.s3) or self.s4)
            return None if nothing else "sums over 0 images are not 0"
        scale = max(float(np.trace(self.s2)), float(np.abs(self.s2).max(initial=0.0)), 1e-300)
        if np.abs(self.s2 - self.s2.T).max(initial=0.0) > _CONSISTENT * scale:
            return "Σxxᵀ is not symmetric"
        centred = self.s2 - np.outer(self.s1, self.s1) / self.n
        if float(np.linalg.eigvalsh((centred + centred.T) / 2.0)[0]) < -_CONSISTENT * scale:
            return "Σxxᵀ − ΣxΣxᵀ/n has a negative eigenvalue: no samples have these sums"
        square = float(np.trace(self.s2))  # Σ|x|²
        if self.s4 < square**2 / self.n * (1.0 - _CONSISTENT):
            return "Σ|x|⁴ is below (Σ|x|²)²/n: no samples have these sums"
        if np.any(self.s3**2 > self.s4 * np.diag(self.s2) * (1.0 + _CONSISTENT) + 1e-300):
            return "Σ|x|²x is beyond what Σ|x|⁴ and Σxxᵀ allow: no samples have these sums"
        return None

    def check(self) -> tuple[EnvelopeCheck, float]:
        """The envelope check of these samples (threshold left at 1) and its shrinkage weight."""
        mean, cov, shrinkage = self.shrunk()
        d = self.dim
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            # Every sample equal along some direction and no shrinkage to lift it: lift it by a hair.
            chol = np.linalg.cholesky(cov + 1e-9 * max(float(np.trace(cov)) / d, 1.0) * np.eye(d))
        whitening = np.linalg.inv(chol)  # W Σ Wᵀ = I
        return EnvelopeCheck(mean=mean, whitening=whitening, threshold=1.0), shrinkage


def envelope_fields(
    check: EnvelopeCheck, shrinkage: float, *, threshold: float, quantile: float, fitted_on: int, folds: int
) -> dict[str, Any]:
    """The fields of a manifest's Gaussian envelope (``GaussianEnvelope``) from its check and threshold."""
    return {
        "mean": [float(v) for v in check.mean],
        "whitening": [[float(v) for v in row] for row in check.whitening],
        "threshold": max(float(threshold), np.finfo(np.float64).tiny),
        "quantile": quantile,
        "shrinkage": float(shrinkage),
        "fitted_on": fitted_on,
        "folds": folds,
    }


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(N, D) samples → (their shrunk covariance (D, D), the shrinkage weight)."""
    _, cov, a = MomentSums.of(x).shrunk()
    return cov, a


def folds_of(keys: Sequence[str], folds: int, salt: str) -> np.ndarray:
    """(N,) the fold of each of a node's images, from their keys (e.g. SOP Instance UIDs): the images in a
    fixed pseudo-random order (a hash of the salt and the key) dealt round-robin over as many folds as give
    every fold ``MIN_FOLD_IMAGES`` (at most ``folds``), from a fold picked by the node's own images, so that
    nodes too small for every fold fill different ones. The same keys and salt give the same folds in both
    rounds. A node with fewer than ``MIN_FOLD_IMAGES`` images has no folds (ValueError)."""
    n = len(keys)
    if n < MIN_FOLD_IMAGES:
        raise ValueError(f"{n} images; a node sends sums over at least {MIN_FOLD_IMAGES}")
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    digests = [int.from_bytes(hashlib.sha256(f"{salt}\0{k}".encode()).digest()[:8], "big") for k in keys]
    order = np.argsort(np.asarray(digests, dtype=np.uint64), kind="stable")
    used = min(folds, n // MIN_FOLD_IMAGES)
    start = int(digests[int(order[0])] % folds)
    out = np.empty(n, dtype=np.int64)
    out[order] = (start + np.arange(n) % used) % folds
    return out


def held_out_checks(per_fold: Sequence[MomentSums]) -> list[EnvelopeCheck]:
    """For each fold, the envelope check fitted on all the other folds' sums (threshold left at 1)."""
    total = MomentSums.total(per_fold)
    return [(total - fold).check()[0] for fold in per_fold]


def fold_sums(x: np.ndarray, fold: np.ndarray, folds: int) -> list[MomentSums]:
    """(N, D) samples and (N,) their folds in [0, folds) → the sums of each fold's samples."""
    d = x.shape[1]
    return [MomentSums.of(x[fold == k]) if np.any(fold == k) else MomentSums.zeros(d) for k in range(folds)]


def histogram_edges(dim: int) -> np.ndarray:
    """(HISTOGRAM_BINS + 1,) the bin edges of squared distances of D-dimensional features."""
    return dim * np.logspace(-_SPAN_DECADES, _SPAN_DECADES, HISTOGRAM_BINS + 1)


def distance_histogram(distances: np.ndarray, dim: int) -> np.ndarray:
    """(N,) squared distances → (HISTOGRAM_BINS + 2,) int64 counts: below the first edge, each bin (a
    distance on an edge goes to the bin it closes), above the last edge (a non-finite distance too)."""
    d = np.asarray(distances, dtype=np.float64)
    index = np.searchsorted(histogram_edges(dim), np.where(np.isfinite(d), d, np.inf), side="left")
    return np.bincount(index, minlength=HISTOGRAM_BINS + 2).astype(np.int64)


def histogram_quantile(counts: np.ndarray, dim: int, quantile: float) -> float:
    """The ``quantile`` of the distances counted in ``counts`` (numpy's "higher" method), read as the upper
    edge of its bin: at most one bin width above the exact value. ValueError when it lies above the last
    edge (the distances are not those of D-dimensional features) or nothing was counted."""
    c = np.asarray(counts, dtype=np.int64)
    total = int(c.sum())
    if c.shape != (HISTOGRAM_BINS + 2,) or total <= 0 or np.any(c < 0):
        raise ValueError("the histogram must hold non-negative counts in HISTOGRAM_BINS + 2 bins, not all 0")
    rank = math.ceil(quantile * (total - 1)) + 1  # the rank of numpy's "higher" quantile, from 1
    b = int(np.searchsorted(np.cumsum(c), rank, side="left"))
    if b > HISTOGRAM_BINS:
        raise ValueError(f"the {quantile} quantile of the distances lies beyond {10**_SPAN_DECADES:g} × D")
    return float(histogram_edges(dim)[b])
