"""Aggregation arithmetic as tiny pure functions over named tensors: means, median, trimmed mean, norm filter.

Every function takes a sequence of ``Params`` (tensor name -> array) that must agree exactly in names,
shapes and dtypes, computes in float64, and returns arrays of the inputs' dtype. Integer tensors (e.g. BN
``num_batches_tracked``) are reduced the same way and rounded to the nearest integer (half to even), so
an average of counters stays a counter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from hub.fl.errors import AggregationError
from hub.fl.strategy import Params, Reducer
from hub.fl.validation import l2_norm

__all__ = [
    "NORM_FILTER_FACTOR",
    "Reducer",
    "check_compatible",
    "coordinate_median",
    "norm_filtered_mean",
    "trimmed_mean",
    "unweighted_mean",
    "weighted_mean",
    "within_norm_filter",
]


def check_compatible(params_list: Sequence[Params]) -> None:
    """Raise AggregationError unless all entries have the same tensor names, shapes and numeric dtypes."""
    if not params_list:
        raise AggregationError("nothing to aggregate: pass at least one set of tensors")
    ref = params_list[0]
    for name, arr in ref.items():
        if arr.dtype.kind not in "fiu":
            raise AggregationError(
                f"tensor {name!r} has dtype {arr.dtype}; only float and integer tensors can be aggregated"
            )
    for k, params in enumerate(params_list[1:], start=1):
        if params.keys() != ref.keys():
            missing = sorted(ref.keys() - params.keys())
            extra = sorted(params.keys() - ref.keys())
            raise AggregationError(
                f"entry {k} has different tensor names than entry 0 (missing {missing}, extra {extra})"
            )
        for name, arr in params.items():
            if arr.shape != ref[name].shape:
                raise AggregationError(
                    f"tensor {name!r}: entry {k} has shape {arr.shape}, entry 0 has {ref[name].shape}"
                )
            if arr.dtype != ref[name].dtype:
                raise AggregationError(
                    f"tensor {name!r}: entry {k} has dtype {arr.dtype}, entry 0 has {ref[name].dtype}"
                )


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float64 result back to the inputs' dtype; integers are rounded first."""
    if dtype.kind in "iu":
        return np.rint(values).astype(dtype)
    return values.astype(dtype)


def _stack(params_list: Sequence[Params], name: str) -> np.ndarray:
    return np.stack([p[name].astype(np.float64) for p in params_list])  # (K, *shape)


def weighted_mean(params_list: Sequence[Params], weights: Sequence[float]) -> Params:
    """Σ_k w_k·x_k / Σ_k w_k per tensor; weights must be finite, non-negative and not all zero."""
    check_compatible(params_list)
    if len(weights) != len(params_list):
        raise AggregationError(f"got {len(params_list)} tensor sets but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise AggregationError(f"weights must be finite and non-negative, got {list(weights)}")
    total = float(w.sum())
    if total <= 0.0:
        raise AggregationError("weights sum to zero: at least one client must report examples")
    out: Params = {}
    for name, ref in params_list[0].items():
        stacked = _stack(params_list, name)
        mean = np.tensordot(w, stacked, axes=1) / total
        out[name] = _cast(mean, ref.dtype)
    return out


def unweighted_mean(params_list: Sequence[Params], weights: Sequence[float] | None = None) -> Params:
    """(1/K) Σ_k x_k per tensor; ``weights`` is accepted (and ignored) so this is a ``Reducer``."""
    return weighted_mean(params_list, [1.0] * len(params_list))


def coordinate_median(params_list: Sequence[Params], weights: Sequence[float] | None = None) -> Params:
    """Coordinate-wise median (mean of the two middle values for an even count); weights are ignored."""
    check_compatible(params_list)
    return {
        name: _cast(np.median(_stack(params_list, name), axis=0), ref.dtype)
        for name, ref in params_list[0].items()
    }


def trimmed_mean(
    params_list: Sequence[Params], weights: Sequence[float] | None = None, *, beta: float = 0.1
) -> Params:
    """Coordinate-wise mean after dropping the floor(beta·K) smallest and largest values; weights ignored."""
    check_compatible(params_list)
    if not 0.0 <= beta < 0.5:
        raise AggregationError(f"trimmed mean needs 0 <= beta < 0.5, got {beta}")
    k = len(params_list)
    cut = math.floor(beta * k)
    out: Params = {}
    for name, ref in params_list[0].items():
        ordered = np.sort(_stack(params_list, name), axis=0)  # (K, *shape), per coordinate
        out[name] = _cast(ordered[cut : k - cut].mean(axis=0), ref.dtype)
    return out


#: The norm filter's default: an update longer than this many times the round's median norm is dropped.
NORM_FILTER_FACTOR = 3.0


def within_norm_filter(norms: Sequence[float], factor: float) -> list[bool]:
    """Which updates the norm filter keeps: joint L2 norm at most ``factor`` × the median of ``norms``.

    The one rule of both norm filters and of the hub's per-node reading of a round
    (``hub.fl.update_audit``), so that what the audit says the filter drops is what it drops.
    """
    if not factor >= 1.0:
        raise AggregationError(f"norm filter factor must be >= 1, got {factor}")
    bound = factor * float(np.median(np.asarray(norms, dtype=np.float64)))
    return [n <= bound for n in norms]


def norm_filtered_mean(
    params_list: Sequence[Params],
    weights: Sequence[float] | None = None,
    *,
    factor: float = NORM_FILTER_FACTOR,
) -> Params:
    """Unweighted mean of the updates whose joint L2 norm is at most ``factor`` × the median norm.

    A scaled (poisoned) update stands out by its norm; the median norm is set by the honest majority.
    Weights are ignored (a client could lie about them).
    """
    check_compatible(params_list)
    keep = within_norm_filter([l2_norm(p) for p in params_list], factor)
    return unweighted_mean([p for p, k in zip(params_list, keep, strict=True) if k])
