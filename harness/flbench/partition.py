"""Split a labelled training set into clinics with quantity and label skew (exact per-class sampling).

A clinic's label mix is a positive prevalence (binary tasks) or a proportion per class (K classes).
"""

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


def mix_counts(size: int, proportions: Sequence[float]) -> tuple[int, ...]:
    """Images per class for a clinic of ``size`` at these class proportions (largest remainder).

    Two classes follow ``class_counts`` (proportions[1] is the prevalence). With more, every class gets at
    least one image while the clinic has room for all, so each grade is present to learn from and to score.
    """
    props = np.asarray(proportions, dtype=np.float64)
    if props.ndim != 1 or len(props) < 2 or np.any(props < 0) or props.sum() <= 0:
        raise ValueError(f"class proportions must be ≥ 0, at least two, not all 0; got {list(proportions)}")
    if len(props) == 2:
        # The binary path is today's: a prevalence, no renormalising that could move it by an ulp.
        total = float(props.sum())
        return class_counts(size, float(props[1]) if abs(total - 1.0) < 1e-9 else float(props[1]) / total)
    props = props / props.sum()
    floor = 1 if size >= len(props) else 0
    counts = np.maximum(floor, np.floor(props * size)).astype(np.int64)
    # Hand out (or take back) the rest by largest remainder, never taking a class below its floor.
    order = np.argsort(-(props * size - np.floor(props * size)), kind="stable")
    k = 0
    while counts.sum() != size:
        c = order[k % len(order)]
        if counts.sum() < size:
            counts[c] += 1
        elif counts[c] > floor:
            counts[c] -= 1
        k += 1
    return tuple(int(n) for n in counts)


def as_mix(mix: float | Sequence[float]) -> tuple[float, ...]:
    """A positive prevalence p as the binary mix (1 − p, p); a mix of class proportions as it is."""
    if isinstance(mix, (int, float)):
        return (1.0 - float(mix), float(mix))
    return tuple(float(v) for v in mix)


def partition_indices(
    labels: np.ndarray,
    sizes: Sequence[int],
    mixes: Sequence[float] | Sequence[Sequence[float]],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each clinic, with exactly the asked size and label mix (a positive
    prevalence per clinic for two classes, or a proportion per class).

    The smallest clinics are filled first, without replacement, so that they hold distinct images; a class
    pool that runs dry is topped up by sampling that class with replacement from the whole split (the large
    clinics then hold some images that also sit elsewhere, as in docs/benchmarks.md).
    """
    if len(sizes) != len(mixes):
        raise ValueError(f"{len(sizes)} sizes but {len(mixes)} label mixes")
    labels = np.asarray(labels).reshape(-1)
    props = [as_mix(m) for m in mixes]
    classes = tuple(range(len(props[0])))
    if any(len(p) != len(classes) for p in props):
        raise ValueError("every clinic's label mix must name the same number of classes")
    by_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    cursor = dict.fromkeys(classes, 0)
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(sizes)
    for k in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        picked: list[np.ndarray] = []
        for cls, need in zip(classes, mix_counts(sizes[k], props[k]), strict=True):
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
