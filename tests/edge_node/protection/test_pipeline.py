"""The node's protection pipeline: clip → noise → compress → mask, with measured bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_node.protection import ProtectionError, ProtectionPipeline, clip_l2, l2_norm
from edge_node.protection.residual import ResidualStore
from edge_node.protocol.accountant import GaussianRelease, epsilon_of
from edge_node.protocol.compression import TopKCompressor, layout_of
from edge_node.protocol.protection import CompressionKind, ProtectionSpec
from edge_node.protocol.tensors import Tensors, decode_tensors, encode_tensors


def _spec(**kw: object) -> ProtectionSpec:
    return ProtectionSpec.model_validate({"cohort_size": 5, **kw})


def test_clipping_bounds_the_norm_and_zeroes_counters() -> None:
    up = {"a": np.array([3.0]), "b": np.array([4.0], dtype=np.float32), "n": np.array(7)}
    out, norm = clip_l2(up, 1.0)
    assert norm == 5.0
    assert out["a"][0] == pytest.approx(0.6) and out["b"][0] == pytest.approx(0.8)
    assert out["b"].dtype == np.float32 and int(out["n"]) == 0  # a count is not bounded by the clip
    inside, _ = clip_l2({"a": np.array([0.3])}, 1.0)
    assert inside["a"][0] == 0.3
    with pytest.raises(ValueError, match="non-finite"):
        clip_l2({"a": np.array([np.nan])}, 1.0)


def test_noise_is_calibrated_to_the_stated_epsilon_after_clipping() -> None:
    pipe = ProtectionPipeline(rng=np.random.default_rng(0))
    spec = _spec(clip_norm=0.5, epsilon=1.0, delta=1e-5)
    d = 200_000
    huge = {"w": np.full(d, 1e3)}  # norm 4.5e5: clipping must come first, or the output keeps it
    out = pipe.protect(huge, spec)
    sigma = out.noise_multiplier
    assert sigma is not None and sigma == pytest.approx(3.7306, abs=1e-3)
    # what leaves is (1, 1e-5)-DP by the accountant that the ledger uses
    assert epsilon_of([GaussianRelease(sigma)], 1e-5) == pytest.approx(1.0, abs=1e-6)
    assert out.clipped and out.norm == pytest.approx(1e3 * np.sqrt(d))
    w = decode_tensors(out.payload)["w"]
    # clipped signal: every coordinate 0.5/sqrt(d); noise std σ·C = 1.8653 (1% of 200k draws)
    assert float(np.mean(w)) == pytest.approx(0.5 / np.sqrt(d), abs=0.02)
    assert float(np.std(w)) == pytest.approx(sigma * 0.5, rel=0.01)
    assert out.epsilon == 1.0


def test_topk_compression_cuts_the_measured_bytes_twentyfold_and_loses_nothing_over_rounds() -> None:
    rng = np.random.default_rng(1)
    pipe = ProtectionPipeline(rng=rng)
    spec = _spec(clip_norm=10.0, compression=CompressionKind.TOPK, topk_fraction=0.01)
    layout = layout_of({"w": np.zeros(50_000, dtype=np.float32)})
    sent = np.zeros(50_000)
    total = np.zeros(50_000)
    for _ in range(3):
        update = {"w": rng.normal(0.0, 0.01, 50_000).astype(np.float32)}
        total += clip_l2(update, 10.0)[0]["w"]
        out = pipe.protect(update, spec)
        dense_bytes = len(encode_tensors(update))
        assert out.payload_bytes == len(out.payload)
        assert dense_bytes / out.payload_bytes >= 20, (dense_bytes, out.payload_bytes)
        sent += TopKCompressor(0.01).decompress(decode_tensors(out.payload), layout)["w"]
    # error feedback: what was sent plus what is still carried is everything clipped so far
    residual = pipe._feedback[(CompressionKind.TOPK, 0.01)].residual["w"]
    np.testing.assert_allclose(sent + residual, total, atol=1e-5)


def test_the_error_feedback_residual_survives_a_restart(tmp_path: Path) -> None:
    """A pipeline that restarts from the node's data directory still owes what the last round dropped."""
    rng = np.random.default_rng(2)
    spec = _spec(compression=CompressionKind.TOPK, topk_fraction=0.05)
    layout = layout_of({"w": np.zeros(2_000, dtype=np.float32)})
    updates = [{"w": rng.normal(size=2_000).astype(np.float32)} for _ in range(3)]
    store = ResidualStore.in_data_dir(tmp_path)
    sent = np.zeros(2_000)
    first = ProtectionPipeline(residuals=store)
    sent += TopKCompressor(0.05).decompress(first.protect(updates[0], spec).wire, layout)["w"]
    assert store.path(CompressionKind.TOPK, 0.05).is_file()
    assert store.path(CompressionKind.TOPK, 0.05).name == "topk-0.05.npz"
    for update in updates[1:]:  # each round in a fresh process: only the file carries the debt
        again = ProtectionPipeline(residuals=ResidualStore.in_data_dir(tmp_path))
        sent += TopKCompressor(0.05).decompress(again.protect(update, spec).wire, layout)["w"]
    owed = store.load(CompressionKind.TOPK, 0.05)["w"]
    total = sum(u["w"].astype(np.float64) for u in updates)
    np.testing.assert_allclose(sent + owed, total, atol=1e-5)
    # A corrupt residual file is ignored with a warning, not fatal: the update still leaves.
    store.path(CompressionKind.TOPK, 0.05).write_bytes(b"not an npz")
    assert store.load(CompressionKind.TOPK, 0.05) == {}
    assert ProtectionPipeline(residuals=store).protect(updates[0], spec).payload_bytes > 0


@pytest.mark.parametrize("kind", [CompressionKind.INT8, CompressionKind.FP16])
def test_quantised_updates_are_smaller_and_close(kind: CompressionKind) -> None:
    rng = np.random.default_rng(2)
    update = {"w": rng.normal(0.0, 0.1, 20_000).astype(np.float32)}
    spec = _spec(compression=kind)
    out = ProtectionPipeline().protect(update, spec)
    back = spec.compressor().decompress(decode_tensors(out.payload), layout_of(update))  # type: ignore[union-attr]
    ratio = len(encode_tensors(update)) / out.payload_bytes
    assert ratio > (3.0 if kind is CompressionKind.INT8 else 1.8)
    assert float(np.max(np.abs(back["w"] - update["w"]))) < (0.01 if kind is CompressionKind.INT8 else 1e-3)


def test_the_mask_step_comes_last_and_is_required_under_secure_aggregation() -> None:
    seen: list[Tensors] = []

    def masker(tensors: object) -> Tensors:
        seen.append(dict(tensors))  # type: ignore[call-overload]
        return {"masked": np.arange(3, dtype=np.uint32)}

    spec = _spec(clip_norm=1.0, epsilon=8.0, secure_aggregation=True)
    pipe = ProtectionPipeline(rng=np.random.default_rng(3))
    with pytest.raises(ProtectionError, match="masker"):
        pipe.protect({"w": np.ones(4)}, spec)
    out = pipe.protect({"w": np.full(4, 10.0)}, spec, masker=masker)
    # the masker saw the clipped and noised update (norm 1 plus noise, not 20)
    assert l2_norm(seen[0]) < 10 and not np.allclose(seen[0]["w"], 0.5)
    assert set(decode_tensors(out.payload)) == {"masked"}
    with pytest.raises(ValueError, match="ring"):
        _spec(clip_norm=1.0, secure_aggregation=True, compression=CompressionKind.TOPK)
    with pytest.raises(ValueError, match="clip_norm"):
        _spec(epsilon=1.0)


def test_the_spec_travels_as_json_and_refuses_unknown_fields() -> None:
    spec = _spec(clip_norm=1.0, epsilon=4.0, sampling_rate=0.5, compression=CompressionKind.INT8)
    assert ProtectionSpec.model_validate_json(spec.model_dump_json()) == spec
    with pytest.raises(ValueError, match="extra"):
        ProtectionSpec.model_validate({"cohort_size": 3, "noise": 0.0})
    with pytest.raises(ValueError, match="cohort_size"):
        ProtectionSpec.model_validate({"cohort_size": 0})
