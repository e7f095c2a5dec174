"""The bundle's input envelope: where the model's embeddings of its validation images lie.

All images fit the mean and a Ledoit–Wolf shrunk covariance. The threshold is the ``quantile`` of
cross-fitted squared Mahalanobis distances: each image's distance from an envelope fitted on the other
folds. Distances of the images that were fitted would be too small (a fitted point is nearer its own mean),
so new images like them would fall outside more often than ``1 - quantile``; cross-fitting gives every
image a held-out distance, which matters where a validation split holds a few dozen images.
The intensity part is fitted the same way on each image's grey-value quantiles, not on the model's
embedding. docs/envelope.md explains the choices and their limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_node.protocol.envelope import intensity_features
from edge_node.protocol.envelope_moments import (
    MomentSums,
    envelope_fields,
    fold_sums,
    held_out_checks,
    ledoit_wolf,
)
from edge_node.protocol.manifest import InputEnvelope, IntensityEnvelope
from export.errors import ExportError

__all__ = [
    "DEFAULT_QUANTILE",
    "FOLDS",
    "INTENSITY_COPIES",
    "INTENSITY_LEVELS",
    "MAX_ENVELOPE_DIM",
    "MIN_IMAGES",
    "augmented_copies",
    "cross_fitted_distances",
    "fit_envelope",
    "fit_intensity_envelope",
    "ledoit_wolf",
]

DEFAULT_QUANTILE = 0.99
#: The whitening matrix is D × D numbers in the signed manifest: 128² keeps it under half a megabyte.
MAX_ENVELOPE_DIM = 128
#: Fewer validation images than this give no envelope worth shipping.
MIN_IMAGES = 40
#: Folds of the cross-fitted threshold.
FOLDS = 5
#: The grey-value quantiles of each image that the intensity envelope is over: the body of the histogram
#: and both tails (docs/envelope.md).
INTENSITY_LEVELS = (0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98)
#: Augmented copies of each validation image in the intensity envelope's fit.
INTENSITY_COPIES = 4


def cross_fitted_distances(e: np.ndarray, folds: int = FOLDS, groups: np.ndarray | None = None) -> np.ndarray:
    """(N,) each row's squared distance from an envelope fitted on the rows of the other folds (row i is in
    fold ``groups[i]`` mod ``folds``; ``groups`` defaults to the row index: rows of one group, such as an
    image and its augmented copies, share a fold)."""
    out = np.empty(len(e))
    fold = (np.arange(len(e)) if groups is None else np.asarray(groups)) % folds
    checks = held_out_checks(fold_sums(e, fold, folds))
    for k, check in enumerate(checks):
        out[fold == k] = check.distances(e[fold == k])
    return out


def _fitted(
    features: np.ndarray, quantile: float, what: str, groups: np.ndarray | None = None
) -> dict[str, Any]:
    """The fields of a Gaussian envelope over (N, D) features (fitted on all, cross-fitted threshold);
    ``groups`` (N,) keeps rows of one image together in the folds, and ``fitted_on`` counts the groups."""
    e = np.asarray(features, dtype=np.float64)
    if e.ndim != 2:
        raise ExportError(f"the {what} needs (N, D) features, got shape {e.shape}")
    d = e.shape[1]
    n = e.shape[0] if groups is None else len(np.unique(groups))
    if n < MIN_IMAGES:
        raise ExportError(f"the {what} needs at least {MIN_IMAGES} validation images, got {n}")
    if d > MAX_ENVELOPE_DIM:
        raise ExportError(f"the {what} is limited to {MAX_ENVELOPE_DIM}-dimensional features, got {d}")
    if not np.all(np.isfinite(e)):
        raise ExportError(f"the {what}'s validation features are not all finite; the model is broken")
    if not 0.0 < quantile < 1.0:
        raise ExportError(f"the {what}'s quantile must lie in (0, 1), got {quantile}")
    check, shrinkage = MomentSums.of(e).check()
    threshold = float(np.quantile(cross_fitted_distances(e, groups=groups), quantile, method="higher"))
    return envelope_fields(check, shrinkage, threshold=threshold, quantile=quantile, fitted_on=n, folds=FOLDS)


def fit_envelope(embeddings: np.ndarray, *, quantile: float = DEFAULT_QUANTILE) -> InputEnvelope:
    """(N, D) embeddings of validation images → the envelope (fitted on all, cross-fitted threshold)."""
    return InputEnvelope(**_fitted(embeddings, quantile, "input envelope"))


def fit_intensity_envelope(
    grey: np.ndarray,
    *,
    levels: Sequence[float] = INTENSITY_LEVELS,
    quantile: float = DEFAULT_QUANTILE,
    copies: int = INTENSITY_COPIES,
    seed: int = 0,
) -> IntensityEnvelope:
    """(N, H, W) validation images as the model sees them before normalisation (grey values in [0, 1]) →
    the intensity envelope over their grey-value quantiles at ``levels``.

    Each image also enters ``copies`` times through the training augmentation (``augmented_copies``): the
    model was trained to take those grey-value changes in stride, and a hub's own validation images come
    from fewer scanners than its federation's (docs/envelope.md). An image and its copies share a fold.
    """
    g = np.asarray(grey, dtype=np.float64)
    if g.ndim != 3:
        raise ExportError(f"the intensity envelope needs (N, H, W) images, got shape {g.shape}")
    if copies < 0:
        raise ExportError(f"the intensity envelope's augmented copies must be 0 or more, got {copies}")
    rows = np.concatenate([g, augmented_copies(g, copies, seed)]) if copies else g
    features = intensity_features(rows, list(levels))
    groups = np.tile(np.arange(len(g)), copies + 1)
    return IntensityEnvelope(
        levels=[float(v) for v in levels],
        augmented_copies=copies,
        **_fitted(features, quantile, "intensity envelope", groups),
    )


def augmented_copies(grey: np.ndarray, copies: int, seed: int = 0) -> np.ndarray:
    """(N, H, W) grey images → (copies × N, H, W): ``copies`` passes through the training augmentation
    (``hub.training.augment.IntensityAugment``), pass k's copy of image i at row k × N + i."""
    import torch

    from hub.training.augment import IntensityAugment

    x = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))[:, None]  # (N, 1, H, W)
    gen = torch.Generator().manual_seed(seed)
    augment = IntensityAugment()
    passes = [augment(x, gen)[:, 0].numpy().astype(np.float64) for _ in range(copies)]
    return np.concatenate(passes) if passes else np.zeros((0, *grey.shape[1:]))
