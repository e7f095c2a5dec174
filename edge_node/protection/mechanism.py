"""The Gaussian mechanism on an update: L2 clipping to a bound, then noise of σ times that bound."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from edge_node.protocol.tensors import Tensors

__all__ = ["add_gaussian_noise", "clip_l2", "l2_norm"]


def l2_norm(update: Mapping[str, np.ndarray]) -> float:
    """Joint L2 norm of the float tensors (computed in float64)."""
    total = 0.0
    for arr in update.values():
        if arr.dtype.kind == "f":
            flat = arr.astype(np.float64).ravel()
            total += float(flat @ flat)
    return math.sqrt(total)


def clip_l2(update: Mapping[str, np.ndarray], clip_norm: float) -> tuple[Tensors, float]:
    """The update scaled so its float tensors' joint L2 norm is at most ``clip_norm``, and the norm before.

    Integer tensors (step counters) are dropped to zero: a count is not bounded by the clip, so it would
    leave unprotected.
    """
    norm = l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("the update has non-finite values; it cannot be clipped or sent")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out: Tensors = {}
    for name, arr in update.items():
        if arr.dtype.kind == "f":
            out[name] = (arr.astype(np.float64) * scale).astype(arr.dtype)
        else:
            out[name] = np.zeros_like(arr)
    return out, norm


def add_gaussian_noise(update: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Tensors:
    """Every float coordinate plus independent N(0, std²) noise (drawn in float64); integers unchanged."""
    out: Tensors = {}
    for name, arr in update.items():
        if arr.dtype.kind == "f":
            noisy = arr.astype(np.float64) + rng.normal(0.0, std, size=arr.shape)
            out[name] = noisy.astype(arr.dtype)
        else:
            out[name] = arr.copy()
    return out
