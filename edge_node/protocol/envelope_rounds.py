"""The two rounds that fit a bundle's input envelope on the nodes' own images: what each side computes.

Round one (``envelope_moments``): each node runs the bundle over the images it learns from, splits them in
folds (``folds_of``) and sends, for the embedding and for the grey-value features, the sums of each fold
(``MomentSums``). The hub adds them up. Round two (``envelope_distances``): the hub sends, per fold, the
envelope fitted on the other folds; each node counts its images' held-out distances in a fixed histogram.
The hub adds those up and reads the threshold from them. The result equals the exporter's cross-fitted
envelope over all the nodes' images, up to the histogram's bin width (docs/envelope.md). No copies through
the augmentation are added: a federation's images already come from its own scanners.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_node.protocol.envelope import EnvelopeCheck
from edge_node.protocol.envelope_moments import (
    HISTOGRAM_BINS,
    MomentSums,
    distance_histogram,
    envelope_fields,
    fold_sums,
    folds_of,
    held_out_checks,
    histogram_quantile,
)
from edge_node.protocol.manifest import InputEnvelope, IntensityEnvelope

__all__ = [
    "EMBEDDING",
    "INTENSITY",
    "MIN_FITTED",
    "PARTS",
    "EnvelopeRounds",
    "added_up",
    "fitted_envelope",
    "held_out_params",
    "node_histograms",
    "node_moments",
    "part_sums",
]

EMBEDDING = "embedding"
INTENSITY = "intensity"
PARTS = (EMBEDDING, INTENSITY)
_SUMS = ("n", "s1", "s2", "s3", "s4")
#: Fewer images than this over all nodes give no envelope worth shipping (as for the exporter's fit).
MIN_FITTED = 40
_MAX_DIM = 128
_MAX_FOLDS = 20


@dataclass(frozen=True)
class EnvelopeRounds:
    """What both rounds are about: the bundle whose envelope is fitted, its embedding's dimension, the
    grey-value quantiles that are the intensity features, and the folds. Travels as the tasks' config."""

    model_id: str
    model_version: str
    embedding_dim: int
    levels: tuple[float, ...]
    folds: int = 5

    def __post_init__(self) -> None:
        if not self.model_id or not self.model_version:
            raise ValueError("the envelope rounds need the bundle's model_id and model_version")
        if not 1 <= self.embedding_dim <= _MAX_DIM:
            raise ValueError(f"embedding_dim must be 1 to {_MAX_DIM}, got {self.embedding_dim}")
        if (
            not self.levels
            or any(not 0.0 <= v <= 1.0 for v in self.levels)
            or any(b <= a for a, b in zip(self.levels, self.levels[1:], strict=False))
        ):
            raise ValueError("levels must be strictly increasing grey-value quantiles in [0, 1]")
        if not 2 <= self.folds <= _MAX_FOLDS:
            raise ValueError(f"folds must be 2 to {_MAX_FOLDS}, got {self.folds}")

    @property
    def salt(self) -> str:
        """The folds depend on the bundle only: both rounds (and a round run again) deal the same folds."""
        return f"{self.model_id}\0{self.model_version}"

    @property
    def dims(self) -> dict[str, int]:
        return {EMBEDDING: self.embedding_dim, INTENSITY: len(self.levels)}

    def to_config(self) -> dict[str, str | int]:
        return {
            "model_id": self.model_id,
            "model_version": self.model_version,
            "embedding_dim": self.embedding_dim,
            "levels": ",".join(repr(v) for v in self.levels),
            "folds": self.folds,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EnvelopeRounds:
        """ValueError with the reason for a config that does not describe envelope rounds."""
        try:
            levels = tuple(float(v) for v in str(config["levels"]).split(","))
            dim, folds = config["embedding_dim"], config.get("folds", 5)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (dim, folds)):
                raise ValueError("embedding_dim and folds must be integers")
            return cls(str(config["model_id"]), str(config["model_version"]), dim, levels, folds)
        except KeyError as exc:
            raise ValueError(f"the envelope rounds' config lacks {exc.args[0]!r}") from None

    def moment_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor a node sends in round one (float64: sums of fourth powers need the range)."""
        out: dict[str, tuple[int, ...]] = {}
        k = self.folds
        for part, d in self.dims.items():
            shapes = ((k,), (k, d), (k, d, d), (k, d), (k,))
            out.update({f"{part}/{name}": shape for name, shape in zip(_SUMS, shapes, strict=True)})
        return out

    def histogram_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor a node sends in round two (int64 counts)."""
        return {f"{part}/histogram": (HISTOGRAM_BINS + 2,) for part in PARTS}


def part_sums(part: str, tensors: Mapping[str, np.ndarray]) -> list[MomentSums]:
    """One part's per-fold sums out of round one's tensors (a node's answer or their sum)."""
    n, s1, s2, s3, s4 = (np.asarray(tensors[f"{part}/{name}"], dtype=np.float64) for name in _SUMS)
    return [MomentSums(float(n[k]), s1[k], s2[k], s3[k], float(s4[k])) for k in range(len(n))]


def node_moments(
    features: Mapping[str, np.ndarray], keys: Sequence[str], rounds: EnvelopeRounds
) -> dict[str, np.ndarray]:
    """Round one at a node: its images' features per part ((N, D) each, N = len(keys)) → the per-fold sums.
    ValueError for fewer than ``MIN_FOLD_IMAGES`` images."""
    fold = folds_of(keys, rounds.folds, rounds.salt)
    out: dict[str, np.ndarray] = {}
    for part in PARTS:
        sums = fold_sums(np.asarray(features[part], dtype=np.float64), fold, rounds.folds)
        out[f"{part}/n"] = np.array([s.n for s in sums])
        out[f"{part}/s1"] = np.stack([s.s1 for s in sums])
        out[f"{part}/s2"] = np.stack([s.s2 for s in sums])
        out[f"{part}/s3"] = np.stack([s.s3 for s in sums])
        out[f"{part}/s4"] = np.array([s.s4 for s in sums])
    return out


def added_up(answers: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """What the hub does with either round's answers: each tensor summed over the nodes that sent it (all
    answers carry the same names and shapes; the round's plan has checked them)."""
    if not answers:
        raise ValueError("no answers to add up")
    return {name: np.sum([a[name] for a in answers], axis=0) for name in answers[0]}


def held_out_params(moments: Mapping[str, np.ndarray], rounds: EnvelopeRounds) -> dict[str, np.ndarray]:
    """Round two's params from round one's summed moments: per part and fold, the envelope fitted on the
    other folds, as ``{part}/mean`` (K, D) and ``{part}/whitening`` (K, D, D). ValueError when the nodes'
    images are too few to fit it."""
    out: dict[str, np.ndarray] = {}
    for part in PARTS:
        sums = part_sums(part, moments)
        total = sum(s.n for s in sums)
        if total < MIN_FITTED:
            raise ValueError(f"the nodes sent sums over {total:g} images; the envelope needs {MIN_FITTED}")
        checks = held_out_checks(sums)
        out[f"{part}/mean"] = np.stack([c.mean for c in checks])
        out[f"{part}/whitening"] = np.stack([c.whitening for c in checks])
    return out


def _checks(part: str, params: Mapping[str, np.ndarray], rounds: EnvelopeRounds) -> list[EnvelopeCheck]:
    mean = np.asarray(params[f"{part}/mean"], dtype=np.float64)
    whitening = np.asarray(params[f"{part}/whitening"], dtype=np.float64)
    d = rounds.dims[part]
    if mean.shape != (rounds.folds, d) or whitening.shape != (rounds.folds, d, d):
        raise ValueError(
            f"{part}: expected mean ({rounds.folds}, {d}) and whitening ({rounds.folds}, {d}, {d})"
        )
    return [EnvelopeCheck(mean=mean[k], whitening=whitening[k], threshold=1.0) for k in range(rounds.folds)]


def node_histograms(
    features: Mapping[str, np.ndarray],
    keys: Sequence[str],
    rounds: EnvelopeRounds,
    params: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Round two at a node: each image's squared distance from the envelope fitted without its fold,
    counted per part in the fixed histogram (no single distance leaves the node)."""
    fold = folds_of(keys, rounds.folds, rounds.salt)
    out: dict[str, np.ndarray] = {}
    for part in PARTS:
        x = np.asarray(features[part], dtype=np.float64)
        distances = np.empty(len(x))
        for k, check in enumerate(_checks(part, params, rounds)):
            distances[fold == k] = check.distances(x[fold == k])
        out[f"{part}/histogram"] = distance_histogram(distances, rounds.dims[part])
    return out


def fitted_envelope(
    moments: Mapping[str, np.ndarray],
    histograms: Mapping[str, np.ndarray],
    rounds: EnvelopeRounds,
    quantile: float,
) -> InputEnvelope:
    """The envelope from both rounds' summed tensors: fitted on all the nodes' images, the threshold the
    ``quantile`` of their held-out distances. ValueError when they are too few or the rounds disagree."""
    fields: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        total = MomentSums.total(part_sums(part, moments))
        if total.n < MIN_FITTED:
            raise ValueError(f"the nodes sent sums over {total.n:g} images; the envelope needs {MIN_FITTED}")
        check, shrinkage = total.check()
        threshold = histogram_quantile(histograms[f"{part}/histogram"], rounds.dims[part], quantile)
        fields[part] = envelope_fields(
            check,
            shrinkage,
            threshold=threshold,
            quantile=quantile,
            fitted_on=int(total.n),
            folds=rounds.folds,
        )
    intensity = IntensityEnvelope(levels=list(rounds.levels), augmented_copies=0, **fields[INTENSITY])
    return InputEnvelope(intensity=intensity, **fields[EMBEDDING])
