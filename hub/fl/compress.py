"""Uplink compression at the hub: the protocol's codecs, and a result decoded back to its dense update.

The codecs themselves live in ``edge_node.protocol.compression`` so that a node and the hub read the same
bytes; this module re-exports them for the strategies and the simulation and turns a malformed wire
payload into a ``PayloadError``.
"""

from __future__ import annotations

from collections.abc import Mapping

from edge_node.protocol.compression import (
    Compressor,
    ErrorFeedback,
    Fp16Compressor,
    Int8Compressor,
    TensorLayout,
    TopKCompressor,
    wire_bytes,
)
from edge_node.protocol.errors import EncodingError
from hub.fl.errors import PayloadError
from hub.fl.strategy import ClientResult

__all__ = [
    "Compressor",
    "ErrorFeedback",
    "Fp16Compressor",
    "Int8Compressor",
    "TopKCompressor",
    "decompress_result",
    "wire_bytes",
]


def decompress_result(
    result: ClientResult, compressor: Compressor, spec: Mapping[str, TensorLayout]
) -> ClientResult:
    """The result with its wire tensors turned back into the dense update the strategy expects."""
    try:
        dense = compressor.decompress(result.update, spec)
    except EncodingError as exc:
        raise PayloadError(f"compressed update of client {result.client_id}: {exc}") from exc
    return ClientResult(result.client_id, result.round, result.num_examples, dense, result.metrics)
