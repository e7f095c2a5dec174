"""Screening of client updates: a hostile or broken update becomes a ClientFailure with a reason."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hub.fl.strategy import ClientFailure, ClientResult

__all__ = ["TensorSpec", "l2_norm", "screen", "spec_of", "update_problem"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype an uploaded tensor must have."""

    shape: tuple[int, ...]
    dtype: np.dtype


def spec_of(params: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    """The expected spec of an update of exactly these tensors (a delta has its parameter's shape/dtype)."""
    return {name: TensorSpec(tuple(arr.shape), arr.dtype) for name, arr in params.items()}


def l2_norm(update: Mapping[str, np.ndarray]) -> float:
    """Joint L2 norm over all float tensors (integer counters such as BN batch counts are left out)."""
    total = 0.0
    for arr in update.values():
        if arr.dtype.kind == "f":
            flat = arr.astype(np.float64).ravel()
            total += float(flat @ flat)
    return math.sqrt(total)


def update_problem(
    update: Mapping[str, object], expected: Mapping[str, TensorSpec], *, max_norm: float | None = None
) -> str | None:
    """Why this update must be rejected, or None if it is acceptable.

    Checks, in order: exactly the expected tensor names; each value a numeric numpy array of the expected
    shape and dtype; every value finite; the joint L2 norm (float tensors) at most ``max_norm``.
    """
    missing = sorted(expected.keys() - update.keys())
    extra = sorted(update.keys() - expected.keys())
    if missing or extra:
        return f"wrong tensor names: missing {missing[:5]}, unexpected {extra[:5]}"
    for name, spec in expected.items():
        arr = update[name]
        if not isinstance(arr, np.ndarray):
            return f"tensor {name!r} is {type(arr).__name__}, not a numpy array"
        if arr.dtype.kind not in "fiu":
            return f"tensor {name!r} has non-numeric dtype {arr.dtype}"
        if tuple(arr.shape) != spec.shape:
            return f"tensor {name!r} has shape {tuple(arr.shape)}, expected {spec.shape}"
        if arr.dtype != spec.dtype:
            return f"tensor {name!r} has dtype {arr.dtype}, expected {spec.dtype}"
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            return f"tensor {name!r} contains NaN or Inf"
    if max_norm is not None:
        norm = l2_norm(update)  # type: ignore[arg-type]  # all values checked to be arrays above
        if norm > max_norm:
            return f"update L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def screen(
    rnd: int,
    results: Sequence[ClientResult],
    expected: Mapping[str, Mapping[str, TensorSpec]],
    *,
    max_norm: float | None = None,
) -> tuple[list[ClientResult], list[ClientFailure]]:
    """Split results into accepted ones and failures (with reasons).

    ``expected`` maps each client asked this round to the spec of the update it must send. A result is
    also rejected if it is for another round, from a client that was not asked, a duplicate of a client
    already accepted, or reports a negative example count.
    """
    accepted: list[ClientResult] = []
    failures: list[ClientFailure] = []
    seen: set[str] = set()
    for res in results:
        spec = expected.get(res.client_id)
        reason: str | None
        if res.round != rnd:
            reason = f"result is for round {res.round}, the open round is {rnd}"
        elif spec is None:
            reason = "client was not asked for an update this round"
        elif res.client_id in seen:
            reason = "duplicate result for this client in the round"
        elif res.num_examples < 0:
            reason = f"negative example count {res.num_examples}"
        else:
            reason = update_problem(res.update, spec, max_norm=max_norm)
        if reason is None:
            seen.add(res.client_id)
            accepted.append(res)
        else:
            logger.warning("round %d: rejected the update of client %s: %s", rnd, res.client_id, reason)
            failures.append(ClientFailure(res.client_id, rnd, reason))
    return accepted, failures
