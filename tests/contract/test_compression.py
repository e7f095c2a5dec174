"""The uplink codecs both sides share: fp16 by hand, malformed payloads, bytes measured from the payload."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.protocol.compression import (
    ErrorFeedback,
    Fp16Compressor,
    TopKCompressor,
    TopKInt8Compressor,
    layout_of,
    wire_bytes,
)
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


def test_topk_int8_by_hand_gaps_and_codes() -> None:
    comp = TopKInt8Compressor(0.5)
    x = {
        "w": np.array([0.0, 2.54, -0.1, 0.0, -1.27, 0.3], dtype=np.float32),
        "b": np.array([0.5, -1.0], dtype=np.float32),
        "n": np.array(7),
    }
    wire = comp.compress(x)
    assert sorted(wire) == ["::gap", "::q", "::scale", "n::raw"]
    # name order: b (positions 0-1) then w (2-7); b keeps 1 of 2 (position 1), w its 3 largest |x| at
    # 1, 4, 5 (positions 3, 6, 7): gaps 1, 2, 3, 1, in one byte each
    np.testing.assert_array_equal(wire["::gap"], [1, 2, 3, 1])
    assert wire["::gap"].dtype == np.uint8
    # scales 1/127 (b) and 2.54/127 = 0.02 (w): codes -127; 127, -64 (rint of -63.5, half to even), 15
    np.testing.assert_array_equal(wire["::q"], np.array([-127, 127, -64, 15], dtype=np.int8))
    np.testing.assert_allclose(wire["::scale"], [1 / 127, 0.02])
    back = comp.decompress(wire, layout_of(x))
    assert list(back) == ["w", "b", "n"]
    np.testing.assert_allclose(back["w"], [0.0, 2.54, 0.0, 0.0, -1.28, 0.3], rtol=1e-6)
    np.testing.assert_allclose(back["b"], [0.0, -1.0])
    assert back["w"].dtype == np.float32 and int(back["n"]) == 7


def test_topk_int8_widens_the_gap_dtype_only_when_it_must() -> None:
    x = np.zeros(70_000, dtype=np.float32)
    x[[3, 300, 69_999]] = [127.0, -127.0, 64.0]  # scale 1: the codes are the values
    wire = TopKInt8Compressor(3 / 70_000).compress({"x": x})
    # the last gap, 69,699, is past two bytes' range (65,535)
    assert wire["::gap"].dtype == np.uint32
    np.testing.assert_array_equal(wire["::gap"], [3, 297, 69_699])
    back = TopKInt8Compressor(3 / 70_000).decompress(wire, layout_of({"x": x}))
    np.testing.assert_array_equal(back["x"], x)
    assert TopKInt8Compressor(2 / 70_000).compress({"x": x})["::gap"].dtype == np.uint16  # 3 and 300


def test_topk_int8_refuses_malformed_parts() -> None:
    comp = TopKInt8Compressor(0.5)
    x = {"w": np.arange(8, dtype=np.float32), "n": np.array(1)}
    wire = comp.compress(x)
    layout = layout_of(x)
    with pytest.raises(EncodingError, match="out of range"):
        comp.decompress({**wire, "::gap": np.array([7, 1, 1, 1], dtype=np.uint8)}, layout)
    with pytest.raises(EncodingError, match="repeat"):
        comp.decompress({**wire, "::gap": np.array([4, 0, 1, 1], dtype=np.uint8)}, layout)
    with pytest.raises(EncodingError, match="gaps"):
        comp.decompress({**wire, "::gap": wire["::gap"].astype(np.int16)}, layout)
    with pytest.raises(EncodingError, match="int8"):
        comp.decompress({**wire, "::q": wire["::q"].astype(np.int16)}, layout)
    with pytest.raises(EncodingError, match="scales"):
        comp.decompress({**wire, "::scale": np.array([0.1, 0.1])}, layout)
    with pytest.raises(EncodingError, match="finite"):
        comp.decompress({**wire, "::scale": np.array([np.nan])}, layout)
    with pytest.raises(EncodingError, match="lacks"):
        comp.decompress({k: v for k, v in wire.items() if k != "::q"}, layout)
    with pytest.raises(EncodingError, match="lacks"):
        comp.decompress({k: v for k, v in wire.items() if k != "n::raw"}, layout)
    with pytest.raises(EncodingError, match="unexpected"):
        comp.decompress({**wire, "w::q": wire["::q"]}, layout)


def test_topk_int8_with_error_feedback_carries_what_it_drops_in_under_half_the_bytes() -> None:
    rng = np.random.default_rng(0)
    update = {"w": rng.normal(size=20_000).astype(np.float32)}
    plain_topk = TopKCompressor(0.05).compress(update)
    packed = TopKInt8Compressor(0.05).compress(update)
    assert wire_bytes(packed) < wire_bytes(plain_topk) / 2  # deflate already shrinks sorted int32 indices
    # error feedback: what 20 rounds have not yet delivered of a constant update is exactly the residual,
    # and it stays bounded while what was delivered grows
    feedback = ErrorFeedback(TopKInt8Compressor(0.05))
    comp = TopKInt8Compressor(0.05)
    delivered = np.zeros(20_000)
    for _ in range(20):
        delivered += comp.decompress(feedback.compress(update), layout_of(update))["w"]
    residual = 20 * update["w"].astype(np.float64) - delivered
    np.testing.assert_allclose(residual, feedback.residual["w"], atol=1e-3)
    assert np.linalg.norm(residual) < 0.4 * np.linalg.norm(20 * update["w"])
