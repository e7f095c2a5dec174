"""pFedNet's differentially sparse upload: only the groups of the shared update that changed much are sent.

The regulariser of docs/algorithms.md §3.5, in the form used here: a clinic does not upload its new
shared-part update u_t itself but its change against the update the hub already holds for it, r_{t−1},
passed through the proximal map of a group lasso,

    d̂ = argmin_d γ Σ_g τ_g ‖d_g‖₂ + ½‖d − (u_t − r_{t−1})‖²  →  d̂_g = max(0, 1 − τ_g/‖δ_g‖) δ_g,

with δ = u_t − r_{t−1}. A group is one output row of a weight tensor (a filter, a neuron) or a whole 1-D
tensor; its threshold τ_g = γ‖δ‖·√(n_g/N) is what the group's norm would be if the change were spread
evenly over the tensor (N values, n_g in the group), so γ = 1 drops every group that changed less than
its fair share. The first upload of a tensor is sent whole (r_0 = 0 would drop most of it). Dropped
groups are exact zeros and cost almost nothing in the compressed npz upload. Both sides then hold
r_t = r_{t−1} + d̂: the clinic in ``DifferentialSparsifier``, the hub in ``DifferentialAssembler``,
which gives the strategy r_t as the clinic's update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hub.fl.errors import PayloadError
from hub.fl.strategy import Params

__all__ = ["DifferentialAssembler", "DifferentialSparsifier", "SparsityReport", "group_shrink"]


def group_shrink(delta: np.ndarray, gamma: float) -> tuple[np.ndarray, int, int]:
    """Group soft-threshold of one float tensor; returns (shrunk tensor, groups zeroed, groups)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)  # (G, n_g)
    total = float(np.linalg.norm(rows))
    if rows.size == 0 or total == 0.0:
        return np.zeros_like(delta), rows.shape[0], rows.shape[0]
    tau = gamma * total * np.sqrt(rows.shape[1] / rows.size)
    norms = np.linalg.norm(rows, axis=1)  # (G,)
    scale = np.where(norms > tau, 1.0 - tau / np.where(norms > 0, norms, 1.0), 0.0)
    shrunk = (rows * scale[:, None]).astype(delta.dtype).reshape(delta.shape)
    return shrunk, int(np.sum(scale == 0.0)), rows.shape[0]


@dataclass(frozen=True)
class SparsityReport:
    """What one sparsified upload dropped: groups and values zeroed, out of all."""

    groups_zeroed: int
    groups: int
    values_zeroed: int
    values: int


class DifferentialSparsifier:
    """Client side: turns each round's update of the named tensors into its sparse change (see module)."""

    def __init__(self, gamma: float) -> None:
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        #: What the hub holds for this clinic (r_{t−1}); empty before the first upload.
        self.reference: dict[str, np.ndarray] = {}
        self.last = SparsityReport(0, 0, 0, 0)

    def encode(self, update: Mapping[str, np.ndarray]) -> Params:
        """The sparse change d̂ for every float tensor of ``update`` (other tensors are sent as they are)."""
        out: Params = {}
        zg = g = zv = v = 0
        for name, arr in update.items():
            if arr.dtype.kind != "f":
                out[name] = arr
                continue
            ref = self.reference.get(name)
            if ref is None or ref.shape != arr.shape:
                # The first upload of a tensor goes whole: there is nothing yet to differ from.
                ref = np.zeros_like(arr)
                shrunk, zeroed, groups = arr.copy(), 0, arr.shape[0] if arr.ndim >= 2 else 1
            else:
                shrunk, zeroed, groups = group_shrink(arr - ref, self.gamma)
            out[name] = shrunk
            self.reference[name] = ref + shrunk
            zg, g = zg + zeroed, g + groups
            zv, v = zv + int(np.sum(shrunk == 0)), v + shrunk.size
        self.last = SparsityReport(zg, g, zv, v)
        return out


class DifferentialAssembler:
    """Hub side: adds each clinic's sparse change to what it held for that clinic, giving r_t."""

    def __init__(self) -> None:
        self.reference: dict[str, dict[str, np.ndarray]] = {}

    def decode(self, client_id: str, change: Mapping[str, np.ndarray]) -> Params:
        held = self.reference.setdefault(client_id, {})
        out: Params = {}
        for name, arr in change.items():
            if arr.dtype.kind != "f":
                out[name] = arr
                continue
            ref = held.get(name)
            if ref is not None and ref.shape != arr.shape:
                raise PayloadError(f"{client_id}: {name} changed shape from {ref.shape} to {arr.shape}")
            total = arr if ref is None else ref + arr
            held[name] = total
            out[name] = total.copy()
        return out
