"""Update compression for the uplink: top-k sparsification or 8-bit quantisation, with error feedback.

A compressor turns a dense update into *wire tensors* (still plain named numpy arrays, so they go through
``hub.fl.codec`` unchanged) and back, given the dense spec the hub already knows from the task
(``hub.fl.validation.spec_of(task.params)``). Wire names are ``<tensor>::<part>``:

- ``TopKCompressor(fraction)``: per float tensor, the ceil(fraction·size) largest-magnitude entries as
  ``::idx`` (int64 flat indices, ascending) and ``::val`` (values, tensor dtype).
- ``Int8Compressor()``: per float tensor, ``::q`` int8 in [−127, 127] and ``::scale`` (float64 scalar,
  max|x|/127), decoded as q·scale.

Integer tensors travel unchanged as ``::raw``. ``ErrorFeedback`` wraps either compressor on the client:
what compression dropped this round (update + carried residual − what was sent) is added to the next
round's update, so nothing is lost over time, only delayed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from hub.fl.errors import PayloadError, StrategyConfigError
from hub.fl.strategy import ClientResult, Params
from hub.fl.validation import TensorSpec, spec_of

__all__ = ["Compressor", "ErrorFeedback", "Int8Compressor", "TopKCompressor", "decompress_result"]

SEP = "::"


class Compressor(ABC):
    """Dense update <-> wire tensors."""

    #: Wire parts of a float tensor.
    parts: tuple[str, ...] = ()

    def compress(self, update: Params) -> Params:
        """Wire tensors for this dense update."""
        wire: Params = {}
        for name, arr in update.items():
            if arr.dtype.kind == "f":
                wire.update({f"{name}{SEP}{part}": v for part, v in self._encode(arr).items()})
            else:
                wire[f"{name}{SEP}raw"] = arr.copy()
        return wire

    def decompress(self, wire: Mapping[str, np.ndarray], spec: Mapping[str, TensorSpec]) -> Params:
        """The dense update of this spec; a missing, extra or malformed wire tensor raises PayloadError."""
        expected: set[str] = set()
        out: Params = {}
        for name, ts in spec.items():
            if ts.dtype.kind == "f":
                parts = {p: self._part(wire, name, p) for p in self.parts}
                expected.update(f"{name}{SEP}{p}" for p in self.parts)
                out[name] = self._decode(parts, ts)
            else:
                raw = self._part(wire, name, "raw")
                expected.add(f"{name}{SEP}raw")
                if raw.shape != ts.shape or raw.dtype != ts.dtype:
                    raise PayloadError(f"{name}: raw tensor has {raw.shape}/{raw.dtype}, expected {ts}")
                out[name] = raw.copy()
        extra = sorted(set(wire) - expected)
        if extra:
            raise PayloadError(f"unexpected wire tensors {extra[:5]}")
        return out

    @staticmethod
    def _part(wire: Mapping[str, np.ndarray], name: str, part: str) -> np.ndarray:
        key = f"{name}{SEP}{part}"
        if key not in wire:
            raise PayloadError(f"compressed update lacks {key!r}")
        return wire[key]

    @abstractmethod
    def _encode(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        """Wire parts of one float tensor."""

    @abstractmethod
    def _decode(self, parts: Mapping[str, np.ndarray], spec: TensorSpec) -> np.ndarray:
        """One float tensor from its wire parts."""


class TopKCompressor(Compressor):
    """Keep the ceil(fraction·size) largest-magnitude entries of each float tensor (ties: lower index)."""

    parts = ("idx", "val")

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise StrategyConfigError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def _encode(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        flat = arr.ravel()
        k = max(1, math.ceil(self.fraction * flat.size)) if flat.size else 0
        idx = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k]).astype(np.int64)
        return {"idx": idx, "val": flat[idx].copy()}

    def _decode(self, parts: Mapping[str, np.ndarray], spec: TensorSpec) -> np.ndarray:
        idx, val = parts["idx"], parts["val"]
        size = math.prod(spec.shape)
        if idx.dtype.kind not in "iu" or idx.ndim != 1 or val.shape != idx.shape or val.dtype != spec.dtype:
            raise PayloadError(f"malformed top-k parts for a tensor of {spec}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise PayloadError(f"top-k index out of range for a tensor of size {size}")
        flat = np.zeros(size, dtype=spec.dtype)
        flat[idx] = val
        return flat.reshape(spec.shape)


class Int8Compressor(Compressor):
    """Symmetric per-tensor 8-bit quantisation: q = rint(x / s), s = max|x| / 127."""

    parts = ("q", "scale")

    def _encode(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        x = arr.astype(np.float64)
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        scale = peak / 127.0
        q = np.zeros(x.shape, dtype=np.int8) if scale == 0 else np.clip(np.rint(x / scale), -127, 127)
        return {"q": q.astype(np.int8), "scale": np.array(scale, dtype=np.float64)}

    def _decode(self, parts: Mapping[str, np.ndarray], spec: TensorSpec) -> np.ndarray:
        q, scale = parts["q"], parts["scale"]
        if q.dtype != np.int8 or q.shape != spec.shape or scale.shape != () or scale.dtype.kind != "f":
            raise PayloadError(f"malformed int8 parts for a tensor of {spec}")
        if not np.isfinite(scale):
            raise PayloadError("int8 scale is not finite")
        return (q.astype(np.float64) * float(scale)).astype(spec.dtype)


class ErrorFeedback:
    """Client-side: compress update + residual, carry forward what the compressor dropped."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.residual: Params = {}

    def compress(self, update: Params) -> Params:
        """Wire tensors for ``update`` plus the residual of earlier rounds; updates the residual."""
        corrected: Params = {}
        for name, arr in update.items():
            carried = self.residual.get(name)
            if arr.dtype.kind == "f" and carried is not None and carried.shape == arr.shape:
                corrected[name] = (arr.astype(np.float64) + carried).astype(arr.dtype)
            else:
                corrected[name] = arr
        wire = self.compressor.compress(corrected)
        sent = self.compressor.decompress(wire, spec_of(corrected))
        self.residual = {
            n: corrected[n].astype(np.float64) - sent[n].astype(np.float64)
            for n in corrected
            if corrected[n].dtype.kind == "f"
        }
        return wire


def decompress_result(
    result: ClientResult, compressor: Compressor, spec: Mapping[str, TensorSpec]
) -> ClientResult:
    """The result with its wire tensors turned back into the dense update the strategy expects."""
    return ClientResult(
        result.client_id,
        result.round,
        result.num_examples,
        compressor.decompress(result.update, spec),
        result.metrics,
    )
