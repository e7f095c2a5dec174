"""What a collection round's answer must satisfy beyond its names, shapes and dtypes, checked at intake.

A training update is judged by its norm (``hub.fl.validation``); an answer of counts or sums is judged by
what counts can be. An answer refused here is refused at once, with the reason, and the node's task stays
open; one accepted is summed as it is, so that a single bad answer cannot fail the whole round at
aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_node.protocol.envelope_moments import MIN_FOLD_IMAGES
from edge_node.protocol.envelope_rounds import PARTS, part_sums
from edge_node.protocol.sketch import FEATURE_MEAN
from edge_node.protocol.updates import UpdateKind

__all__ = ["answer_problem"]


def answer_problem(kind: str, update: Mapping[str, np.ndarray]) -> str | None:
    """Why an answer of round kind ``kind`` must be refused, or None (also for kinds with nothing to check).
    The tensors' names, shapes and dtypes have been checked already."""
    if kind in (UpdateKind.STATS.value, UpdateKind.ENVELOPE_DISTANCES.value):
        unfinite = _unfinite(update)
        if unfinite:
            return unfinite
        mean = update.get(FEATURE_MEAN)
        if kind == UpdateKind.STATS.value and mean is not None and np.any((mean < 0) | (mean > 1)):
            return f"{FEATURE_MEAN!r} is a mean of grey values in [0, 1] and holds values outside it"
        negative = sorted(name for name, value in update.items() if np.any(value < 0))
        return f"negative counts in {negative[:3]}" if negative else None
    if kind == UpdateKind.ENVELOPE_MOMENTS.value:
        return _moments_problem(update)
    if kind == UpdateKind.KEPT_TENSORS.value:
        return _kept_problem(update)
    return None


def _unfinite(update: Mapping[str, np.ndarray]) -> str | None:
    """Which tensors hold NaN or Inf (the first three), or None."""
    unfinite = sorted(name for name, value in update.items() if not np.all(np.isfinite(value)))
    return f"NaN or Inf in {unfinite[:3]}" if unfinite else None


def _kept_problem(update: Mapping[str, np.ndarray]) -> str | None:
    """What a node kept is finite, and a BatchNorm variance is not negative: a made-up answer is refused
    before it reaches the model the clinics that did not train are sent."""
    unfinite = _unfinite(update)
    if unfinite:
        return unfinite
    negative = sorted(
        name
        for name, value in update.items()
        if name.rsplit(".", 1)[-1] in ("running_var", "num_batches_tracked") and np.any(value < 0)
    )
    return f"negative variances or counts in {negative[:3]}" if negative else None


def _moments_problem(update: Mapping[str, np.ndarray]) -> str | None:
    """Each fold's image count is a whole number, 0 or at least ``MIN_FOLD_IMAGES`` (no node sends a sum
    over fewer), the same for both parts, and not 0 everywhere; and each fold's sums are what some images
    could have (``MomentSums.problem``): a buggy or made-up answer is refused before it moves the fit."""
    counts = {part: np.asarray(update[f"{part}/n"]) for part in PARTS}
    for part, n in counts.items():
        if np.any(n < 0) or np.any(n != np.round(n)):
            return f"{part}/n holds something that is not a count of images"
        if np.any((n > 0) & (n < MIN_FOLD_IMAGES)):
            return f"{part}/n has a fold of fewer than {MIN_FOLD_IMAGES} images, which no node sends"
        if not np.any(n > 0):
            return f"{part}/n counts no image"
    first, *others = counts.values()
    if any(not np.array_equal(first, n) for n in others):
        return "the parts' folds hold different numbers of images (each image is in one fold of each part)"
    for part in PARTS:
        for k, sums in enumerate(part_sums(part, update)):
            problem = sums.problem()
            if problem is not None:
                return f"{part}, fold {k}: {problem}"
    return None
