"""The uplink codecs both sides share: fp16 by hand, malformed payloads, bytes measured from the payload."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.protocol.compression import Fp16Compressor, TopKCompressor, layout_of, wire_bytes
from edge_node.protocol.errors import EncodingError
from edge_node.protocol.tensors import encode_tensors


def test_fp16_by_hand_and_its_refusals() -> None:
    comp = Fp16Compressor()
    x = {"x": np.array([1.0, -2.5, 1e5, 1 / 3], dtype=np.float32), "n": np.array(4)}
    wire = comp.compress(x)
    assert wire["x::h"].dtype == np.float16 and int(wire["n::raw"]) == 4
    back = comp.decompress(wire, layout_of(x))
    # 1e5 saturates at the largest half, 65504; 1/3 rounds to 0.33325 (11-bit mantissa)
    np.testing.assert_array_equal(back["x"], np.array([1.0, -2.5, 65504.0, 0.333251953125], dtype=np.float32))
    with pytest.raises(EncodingError, match="fp16"):
        comp.decompress({**wire, "x::h": wire["x::h"].astype(np.float32)}, layout_of(x))
    with pytest.raises(EncodingError, match="finite"):
        comp.decompress({**wire, "x::h": np.array([np.inf] * 4, dtype=np.float16)}, layout_of(x))


def test_wire_bytes_is_the_encoded_payload_length() -> None:
    update = {"w": np.random.default_rng(0).normal(size=10_000).astype(np.float32)}
    wire = TopKCompressor(0.01).compress(update)
    assert wire_bytes(wire) == len(encode_tensors(wire))
    assert wire_bytes(update) / wire_bytes(wire) > 20
