"""The codec of a round's updates: compressed wire tensors back to the dense update the strategy expects.

A round started with compression (top-k, int8, fp16) receives each node's update as the protocol's wire
tensors; the hub decodes them with the same classes the node encoded with, against the layout the task
asked for. A plain round's tensors pass through unchanged. A payload that does not decode (a dense update
in a compressed round, a missing part, an index out of range) raises ``EncodingError`` with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge_node.protocol.compression import Compressor
from edge_node.protocol.protection import compressor_for
from edge_node.protocol.wire import RoundProtection
from hub.fl.strategy import Params
from hub.fl.validation import TensorSpec

__all__ = ["dense_update", "round_compressor"]


def round_compressor(protection: Mapping[str, Any] | None) -> Compressor | None:
    """The codec the round's stored protection asks for; None for dense (plain) updates."""
    if protection is None:
        return None
    stated = RoundProtection.model_validate(protection)
    return compressor_for(stated.compression, stated.topk_fraction)


def dense_update(compressor: Compressor | None, wire: Params, expected: Mapping[str, TensorSpec]) -> Params:
    """The dense update of these wire tensors (the tensors themselves for a plain round)."""
    if compressor is None:
        return wire
    return compressor.decompress(wire, expected)
