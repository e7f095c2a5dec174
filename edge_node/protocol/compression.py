"""Update compression for the uplink: top-k sparsification, 8-bit or fp16 quantisation, with error feedback.

The node compresses and the hub decompresses with these same classes, so both sides read the same bytes.
A compressor turns a dense update into *wire tensors* (still plain named numpy arrays, so they travel as
npz through ``edge_node.protocol.tensors`` unchanged) and back, given the dense layout the hub already
knows from the task (anything with ``shape`` and ``dtype`` per tensor, e.g. ``layout_of(task.params)``).
Wire names are ``<tensor>::<part>``:

- ``TopKCompressor(fraction)``: per float tensor, the ceil(fraction·size) largest-magnitude entries as
  ``::idx`` (int32 flat indices, ascending) and ``::val`` (values, tensor dtype).
- ``Int8Compressor()``: per float tensor, ``::q`` int8 in [−127, 127] and ``::scale`` (float64 scalar,
  max|x|/127), decoded as q·scale.
- ``Fp16Compressor()``: per float tensor, ``::h`` float16 (values beyond ±65504 saturate).
- ``TopKInt8Compressor(fraction)``: top-k as above, packed for the whole update under the empty tensor
  name: the kept positions delta-coded as ``::gap``, the values int8-quantised as ``::q`` with one
  ``::scale`` per float tensor: about 2 bytes per kept value instead of 8, and three npz members in all.

Integer tensors travel unchanged as ``::raw``. ``ErrorFeedback`` wraps either compressor on the client:
what compression dropped this round (update + carried residual − what was sent) is added to the next
round's update, so nothing is lost over time, only delayed. ``wire_bytes`` is what the upload costs:
the length of the encoded npz payload, measured, never estimated. A malformed wire payload raises
``EncodingError``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge_node.protocol.errors import EncodingError
from edge_node.protocol.tensors import Tensors, encode_tensors

__all__ = [
    "Compressor",
    "ErrorFeedback",
    "Fp16Compressor",
    "Int8Compressor",
    "Layout",
    "TensorLayout",
    "TensorwiseCompressor",
    "TopKCompressor",
    "TopKInt8Compressor",
    "layout_of",
    "wire_bytes",
]

SEP = "::"


class TensorLayout(Protocol):
    """What a decoder must know of a dense tensor: its shape and dtype."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...


@dataclass(frozen=True)
class Layout:
    """The shape and dtype of one dense tensor."""

    shape: tuple[int, ...]
    dtype: np.dtype


def layout_of(params: Mapping[str, np.ndarray]) -> dict[str, Layout]:
    """The layout of exactly these tensors (a delta has its parameter's shape and dtype)."""
    return {name: Layout(tuple(arr.shape), arr.dtype) for name, arr in params.items()}


def wire_bytes(wire: Mapping[str, np.ndarray]) -> int:
    """Bytes on the wire: the length of the encoded (compressed npz) payload of these tensors."""
    return len(encode_tensors(wire))


class Compressor(ABC):
    """Dense update <-> wire tensors."""

    @abstractmethod
    def compress(self, update: Tensors) -> Tensors:
        """Wire tensors for this dense update."""

    @abstractmethod
    def decompress(self, wire: Mapping[str, np.ndarray], spec: Mapping[str, TensorLayout]) -> Tensors:
        """The dense update of this spec; a missing, extra or malformed wire tensor raises EncodingError."""

    @staticmethod
    def _part(wire: Mapping[str, np.ndarray], name: str, part: str) -> np.ndarray:
        key = f"{name}{SEP}{part}"
        if key not in wire:
            raise EncodingError(f"compressed update lacks {key!r}")
        return wire[key]


class TensorwiseCompressor(Compressor):
    """A codec that encodes each float tensor on its own into named parts."""

    #: Wire parts of a float tensor.
    parts: tuple[str, ...] = ()

    def compress(self, update: Tensors) -> Tensors:
        """Wire tensors for this dense update."""
        wire: Tensors = {}
        for name, arr in update.items():
            if arr.dtype.kind == "f":
                wire.update({f"{name}{SEP}{part}": v for part, v in self._encode(arr).items()})
            else:
                wire[f"{name}{SEP}raw"] = arr.copy()
        return wire

    def decompress(self, wire: Mapping[str, np.ndarray], spec: Mapping[str, TensorLayout]) -> Tensors:
        """The dense update of this spec; a missing, extra or malformed wire tensor raises EncodingError."""
        expected: set[str] = set()
        out: Tensors = {}
        for name, ts in spec.items():
            if ts.dtype.kind == "f":
                parts = {p: self._part(wire, name, p) for p in self.parts}
                expected.update(f"{name}{SEP}{p}" for p in self.parts)
                out[name] = self._decode(parts, ts)
            else:
                raw = self._part(wire, name, "raw")
                expected.add(f"{name}{SEP}raw")
                if raw.shape != ts.shape or raw.dtype != ts.dtype:
                    raise EncodingError(f"{name}: raw tensor has {raw.shape}/{raw.dtype}, expected {ts}")
                out[name] = raw.copy()
        extra = sorted(set(wire) - expected)
        if extra:
            raise EncodingError(f"unexpected wire tensors {extra[:5]}")
        return out

    @abstractmethod
    def _encode(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        """Wire parts of one float tensor."""

    @abstractmethod
    def _decode(self, parts: Mapping[str, np.ndarray], spec: TensorLayout) -> np.ndarray:
        """One float tensor from its wire parts."""


class TopKCompressor(TensorwiseCompressor):
    """Keep the ceil(fraction·size) largest-magnitude entries of each float tensor (ties: lower index)."""

    parts = ("idx", "val")

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def _encode(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        flat = arr.ravel()
        # int32 indices (int64 only past 2^31 entries): they are half of what top-k sends.
        index_dtype = np.int32 if flat.size < 2**31 else np.int64
        idx = _top_indices(flat, self.fraction).astype(index_dtype)
        return {"idx": idx, "val": flat[idx].copy()}

    def _decode(self, parts: Mapping[str, np.ndarray], spec: TensorLayout) -> np.ndarray:
        idx, val = parts["idx"], parts["val"]
        size = math.prod(spec.shape)
        if idx.dtype.kind not in "iu" or idx.ndim != 1 or val.shape != idx.shape or val.dtype != spec.dtype:
            raise EncodingError(f"malformed top-k parts for a tensor of {spec}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise EncodingError(f"top-k index out of range for a tensor of size {size}")
        flat = np.zeros(size, dtype=spec.dtype)
        flat[idx] = val
        return flat.reshape(spec.shape)


def _top_indices(flat: np.ndarray, fraction: float) -> np.ndarray:
    """Ascending flat indices of the ceil(fraction·size) largest-magnitude entries (ties: lower index)."""
    k = max(1, math.ceil(fraction * flat.size)) if flat.size else 0
    return np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])


def _quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit codes in [−127, 127] and the float64 scale max|x| / 127 (0 for an all-zero x)."""
    x = x.astype(np.float64)
    scale = float(np.max(np.abs(x))) / 127.0 if x.size else 0.0
    q = np.zeros(x.shape) if scale == 0 else np.clip(np.rint(x / scale), -127, 127)
    return q.astype(np.int8), np.array(scale, dtype=np.float64)


def _dequantise(q: np.ndarray, scale: np.ndarray, spec: TensorLayout) -> np.ndarray:
    if q.dtype != np.int8 or scale.shape != () or scale.dtype.kind != "f":
        raise EncodingError(f"malformed int8 parts for a tensor of {spec}")
    if not np.isfinite(scale):
        raise EncodingError("int8 scale is not finite")
    return q.astype(np.float64) * float(scale)


class TopKInt8Compressor(Compressor):
    """Top-k per float tensor, packed for the whole update: delta-coded indices and int8 values.

    Each float tensor keeps its ceil(fraction·size) largest-magnitude entries, as ``TopKCompressor`` does,
    but the wire holds three arrays for the whole update rather than parts per tensor (an npz member costs
    about 200 bytes of headers, as much as 100 kept values): the float tensors are taken in name order and
    flattened end to end; ``::gap`` is the first kept position, then the distance from each kept position
    to the previous one (narrowest unsigned dtype that holds the largest); ``::q`` the int8 codes;
    ``::scale`` one float64 scale (max|x| / 127 of the kept values) per float tensor. Integer tensors
    travel as ``<tensor>::raw``.
    """

    parts = ("gap", "q", "scale")  # of the whole update, under the empty tensor name

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def compress(self, update: Tensors) -> Tensors:
        wire: Tensors = {f"{n}{SEP}raw": a.copy() for n, a in update.items() if a.dtype.kind != "f"}
        positions, codes, scales = [], [], []
        offset = 0
        for name in sorted(n for n, a in update.items() if a.dtype.kind == "f"):
            flat = update[name].ravel()
            idx = _top_indices(flat, self.fraction)
            q, scale = _quantise(flat[idx])
            positions.append(idx.astype(np.int64) + offset)
            codes.append(q)
            scales.append(scale)
            offset += flat.size
        kept = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
        gaps = np.diff(kept, prepend=0)
        # Sorted positions of a dense-ish selection are close together: most gaps fit in one byte.
        largest = int(gaps.max()) if gaps.size else 0
        gap_dtype = next(d for d in (np.uint8, np.uint16, np.uint32, np.uint64) if largest <= np.iinfo(d).max)
        wire[f"{SEP}gap"] = gaps.astype(gap_dtype)
        wire[f"{SEP}q"] = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int8)
        wire[f"{SEP}scale"] = np.array(scales, dtype=np.float64)
        return wire

    def decompress(self, wire: Mapping[str, np.ndarray], spec: Mapping[str, TensorLayout]) -> Tensors:
        out: Tensors = {}
        for name, ts in spec.items():
            if ts.dtype.kind != "f":
                raw = self._part(wire, name, "raw")
                if raw.shape != ts.shape or raw.dtype != ts.dtype:
                    raise EncodingError(f"{name}: raw tensor has {raw.shape}/{raw.dtype}, expected {ts}")
                out[name] = raw.copy()
        floats = sorted(n for n, ts in spec.items() if ts.dtype.kind == "f")
        gap, q, scale = (self._part(wire, "", p) for p in self.parts)
        expected = {f"{SEP}{p}" for p in self.parts} | {f"{n}{SEP}raw" for n in out}
        extra = sorted(set(wire) - expected)
        if extra:
            raise EncodingError(f"unexpected wire tensors {extra[:5]}")
        sizes = [math.prod(spec[n].shape) for n in floats]
        total = sum(sizes)
        if gap.dtype.kind != "u" or gap.ndim != 1 or q.shape != gap.shape or gap.size > total:
            raise EncodingError("malformed top-k gaps for this update")
        if q.dtype != np.int8 or scale.dtype.kind != "f" or scale.shape != (len(floats),):
            raise EncodingError(f"malformed int8 parts: expected {len(floats)} scales and int8 codes")
        if not np.all(np.isfinite(scale)):
            raise EncodingError("int8 scale is not finite")
        if gap.size > 1 and int(gap[1:].min()) == 0:
            raise EncodingError("top-k gaps repeat a position")
        pos = np.cumsum(gap.astype(np.uint64)).astype(np.int64)
        if pos.size and int(pos[-1]) >= total:
            raise EncodingError(f"top-k position out of range for an update of {total} values")
        starts = np.cumsum([0, *sizes])
        owner = np.searchsorted(starts, pos, side="right") - 1  # which float tensor each value belongs to
        dense = np.zeros(total, dtype=np.float64)
        dense[pos] = q.astype(np.float64) * scale[owner] if pos.size else 0.0
        for k, name in enumerate(floats):
            part = dense[starts[k] : starts[k + 1]]
            out[name] = part.astype(spec[name].dtype).reshape(spec[name].shape)
        return {name: out[name] for name in spec}


class Int8Compressor(TensorwiseCompressor):
    """Symmetric per-tensor 8-bit quantisation: q = rint(x / s), s = max|x| / 127."""

    parts = ("q", "scale")

    def _encode(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        q, scale = _quantise(arr)
        return {"q": q, "scale": scale}

    def _decode(self, parts: Mapping[str, np.ndarray], spec: TensorLayout) -> np.ndarray:
        if parts["q"].shape != spec.shape:
            raise EncodingError(f"malformed int8 parts for a tensor of {spec}")
        return _dequantise(parts["q"], parts["scale"], spec).astype(spec.dtype)


class Fp16Compressor(TensorwiseCompressor):
    """Half precision: each float tensor as float16 (2 bytes per value; beyond ±65504 saturates)."""

    parts = ("h",)

    def _encode(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        limit = float(np.finfo(np.float16).max)
        return {"h": np.clip(arr.astype(np.float64), -limit, limit).astype(np.float16)}

    def _decode(self, parts: Mapping[str, np.ndarray], spec: TensorLayout) -> np.ndarray:
        h = parts["h"]
        if h.dtype != np.float16 or h.shape != spec.shape:
            raise EncodingError(f"malformed fp16 part for a tensor of {spec}")
        if not np.all(np.isfinite(h)):
            raise EncodingError("fp16 values are not all finite")
        return h.astype(spec.dtype)


class ErrorFeedback:
    """Client-side: compress update + residual, carry forward what the compressor dropped."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.residual: Tensors = {}

    def compress(self, update: Tensors) -> Tensors:
        """Wire tensors for ``update`` plus the residual of earlier rounds; updates the residual."""
        corrected: Tensors = {}
        for name, arr in update.items():
            carried = self.residual.get(name)
            if arr.dtype.kind == "f" and carried is not None and carried.shape == arr.shape:
                corrected[name] = (arr.astype(np.float64) + carried).astype(arr.dtype)
            else:
                corrected[name] = arr
        wire = self.compressor.compress(corrected)
        sent = self.compressor.decompress(wire, layout_of(corrected))
        self.residual = {
            n: corrected[n].astype(np.float64) - sent[n].astype(np.float64)
            for n in corrected
            if corrected[n].dtype.kind == "f"
        }
        return wire
