"""The input envelope's distances: the exporter sets its thresholds with them, the node applies them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edge_node.protocol.manifest import GaussianEnvelope, IntensityEnvelope

__all__ = [
    "DRIFT_ALARM_P",
    "DRIFT_TOLERANCE",
    "NEGATIVE_MARGIN",
    "EnvelopeCheck",
    "IntensityCheck",
    "IntensityJudgement",
    "binomial_tail",
    "drift_alarm",
    "intensity_features",
    "looks_negative",
]

#: A count of images outside the envelope whose binomial tail is below this is more than chance.
DRIFT_ALARM_P = 0.001
#: The drift alarm tolerates this many times the chance rate (1 − quantile): a clinic whose own images sit
#: at the edge of the validation set's (a few per cent outside) is not drifting; docs/envelope.md says how
#: this was chosen.
DRIFT_TOLERANCE = 5.0
#: An image outside the intensity envelope "looks negative" when its inverse (1 − grey) lies inside it and
#: this many times nearer its mean (in units of the threshold) than the image itself.
NEGATIVE_MARGIN = 4.0


@dataclass(frozen=True)
class EnvelopeCheck:
    """The manifest's envelope as arrays, ready to score embeddings (built once per loaded model)."""

    mean: np.ndarray  # (D,)
    whitening: np.ndarray  # (D, D)
    threshold: float

    @classmethod
    def of(cls, envelope: GaussianEnvelope) -> EnvelopeCheck:
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


def intensity_features(grey: np.ndarray, levels: tuple[float, ...] | list[float]) -> np.ndarray:
    """(N, ...) grey images in [0, 1] → (N, L): each image's grey-value quantiles at ``levels``."""
    g = np.asarray(grey, dtype=np.float64)
    if len(g) == 0:
        return np.zeros((0, len(levels)))
    ordered = np.sort(g.reshape(len(g), -1), axis=1)  # (N, P)
    # numpy's default ("linear") quantile: the value at position q (P − 1), between its two neighbours.
    position = np.asarray(levels, dtype=np.float64) * (ordered.shape[1] - 1)
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, ordered.shape[1] - 1)
    weight = position - below
    return ordered[:, below] * (1.0 - weight) + ordered[:, above] * weight


@dataclass(frozen=True)
class IntensityJudgement:
    """Where each of N images' grey values lie relative to the intensity envelope."""

    #: (N,) bool: outside the intensity envelope.
    outside: np.ndarray
    #: (N,) each image's distance over the threshold.
    ratio: np.ndarray
    #: (N,) bool: outside, while its inverse lies inside and ``NEGATIVE_MARGIN`` times nearer.
    negative: np.ndarray
    #: (N, L) the images' own grey-value features (``intensity_features`` at the levels), the ones judged.
    features: np.ndarray


@dataclass(frozen=True)
class IntensityCheck:
    """The manifest's intensity envelope as arrays (built once per loaded model)."""

    levels: tuple[float, ...]
    check: EnvelopeCheck
    #: The quantiles taken of each image: the levels and their mirrors (1 − level), sorted, once each.
    taken: tuple[float, ...] = field(init=False)
    #: Where in ``taken`` each level lies, and each level's mirror.
    own_at: tuple[int, ...] = field(init=False)
    mirror_at: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        taken = sorted({round(v, 12) for v in self.levels} | {round(1.0 - v, 12) for v in self.levels})
        at = {v: i for i, v in enumerate(taken)}
        object.__setattr__(self, "taken", tuple(taken))
        object.__setattr__(self, "own_at", tuple(at[round(v, 12)] for v in self.levels))
        object.__setattr__(self, "mirror_at", tuple(at[round(1.0 - v, 12)] for v in self.levels))

    @classmethod
    def of(cls, envelope: IntensityEnvelope) -> IntensityCheck:
        return cls(levels=tuple(envelope.levels), check=EnvelopeCheck.of(envelope))

    def features_and_inverse(self, grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, ...) grey images → the features of the images and of their inverses (1 − grey), (N, L) each,
        from one pass: the inverse's quantile at q is 1 − the image's at 1 − q (exactly, with linear
        interpolation), so the images' quantiles at the levels and their mirrors give both."""
        q = intensity_features(grey, self.taken)  # (N, M)
        return q[:, list(self.own_at)], 1.0 - q[:, list(self.mirror_at)]

    def judge(self, grey: np.ndarray) -> IntensityJudgement:
        """(N, ...) grey images in [0, 1] (the model input before normalisation) → their judgement."""
        return self.judge_features(*self.features_and_inverse(grey))

    def judge_features(self, own: np.ndarray, flipped: np.ndarray) -> IntensityJudgement:
        """The judgement from features already taken (``features_and_inverse``): images judged against
        several envelopes with the same levels take them once."""
        outside, ratio = self.check.judge(own)
        _, inverse = self.check.judge(flipped)
        with np.errstate(invalid="ignore"):
            negative = outside & (inverse <= 1.0) & (inverse * NEGATIVE_MARGIN < ratio)
        return IntensityJudgement(outside=outside, ratio=ratio, negative=negative, features=own)


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


def looks_negative(intensity_outside: int, negative: int, n: int, quantile: float) -> bool:
    """Whether a clinic's recent images look like negatives of the validation images: more of them lie
    outside the intensity envelope than chance allows (``drift_alarm``) and at least half of those look
    negative (their inverse lies well inside). The usual cause is a display header that says the wrong
    thing (MONOCHROME1 against MONOCHROME2, a Presentation LUT Shape of INVERSE)."""
    return drift_alarm(intensity_outside, n, quantile) and 2 * negative >= intensity_outside > 0
