"""Split a labelled training set into clinics with quantity and label skew (exact per-class sampling)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def clinic_sizes(total: int, shares: Sequence[float]) -> list[int]:
    """Images per clinic for fractional shares of ``total`` (at least 2 each, so both classes can appear)."""
    return [max(2, round(total * s)) for s in shares]


def class_counts(size: int, prevalence: float) -> tuple[int, int]:
    """(negatives, positives) for a clinic of ``size`` at this positive prevalence; both classes present."""
    pos = min(size - 1, max(1, round(size * prevalence)))
    return size - pos, pos


def partition_indices(
    labels: np.ndarray, sizes: Sequence[int], prevalences: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Indices into ``labels`` for each clinic, with exactly the asked size and positive prevalence.

    The smallest clinics are filled first, without replacement, so that they hold distinct images; a class
    pool that runs dry is topped up by sampling that class with replacement from the whole split (the large
    clinics then hold some images that also sit elsewhere, as in docs/benchmarks.md).
    """
    if len(sizes) != len(prevalences):
        raise ValueError(f"{len(sizes)} sizes but {len(prevalences)} prevalences")
    labels = np.asarray(labels).reshape(-1)
    by_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in (0, 1)}
    cursor = {0: 0, 1: 0}
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(sizes)
    for k in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        picked: list[np.ndarray] = []
        for cls, need in zip((0, 1), class_counts(sizes[k], prevalences[k]), strict=True):
            pool = by_class[cls]
            take = pool[cursor[cls] : cursor[cls] + need]
            cursor[cls] += len(take)
            if len(take) < need:
                take = np.concatenate([take, rng.choice(pool, size=need - len(take), replace=True)])
            picked.append(take)
        out[k] = rng.permutation(np.concatenate(picked)).astype(np.int64)
    return out


def stratified_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A subset of ``size`` indices keeping the class proportions (sorted, no replacement)."""
    labels = np.asarray(labels).reshape(-1)
    if size >= len(labels):
        return np.arange(len(labels))
    picked = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n = max(1, round(size * len(idx) / len(labels)))
        picked.append(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))[:size]
