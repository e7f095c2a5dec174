"""Robust and differential-privacy wrappers (on the shared accountant), compression and the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fl_helpers import make_result

from edge_node.protocol.accountant import GaussianRelease, epsilon_of
from edge_node.protocol.errors import EncodingError
from hub.fl.compress import ErrorFeedback, Int8Compressor, TopKCompressor, decompress_result
from hub.fl.errors import PayloadError, StrategyConfigError
from hub.fl.fedavg import FedAvg
from hub.fl.hsl import HSL
from hub.fl.pfednet import PFedNet
from hub.fl.privacy import DifferentialPrivacy, clip_update
from hub.fl.registry import available_strategies, make_strategy
from hub.fl.robust import Robust
from hub.fl.strategy import ClientResult, Params
from hub.fl.validation import spec_of

# -- robust -------------------------------------------------------------------------------------------------


def _one_tensor_round(strategy: Robust | DifferentialPrivacy | FedAvg, values: list[list[float]]) -> Params:
    ids = [f"c{i}" for i in range(len(values))]
    strategy.initialize({"w": np.zeros(2)}, ids)
    tasks = strategy.configure_round(1, ids)
    results = [
        make_result(t, {"w": v}, 10 * (i + 1)) for i, (t, v) in enumerate(zip(tasks, values, strict=True))
    ]
    new = strategy.aggregate(1, results, [])
    assert new is not None
    return new


def test_robust_median_and_trimmed_mean_wrap_a_strategy() -> None:
    values = [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [1000.0, -1000.0]]
    # median per coordinate: 3 and 20 (sample counts ignored)
    np.testing.assert_array_equal(_one_tensor_round(Robust(FedAvg(), "median"), values)["w"], [3.0, 20.0])
    # trimmed beta=0.2 drops one from each end: (2+3+4)/3 = 3 ; (10+20+30)/3 = 20
    got = _one_tensor_round(Robust(FedAvg(), "trimmed_mean", beta=0.2), values)["w"]
    np.testing.assert_array_equal(got, [3.0, 20.0])
    # the plain weighted mean is dragged away by the outlier: (10+40+90+160+50000)/150 = 335.33...
    assert _one_tensor_round(FedAvg(), values)["w"][0] == pytest.approx(50300 / 150)
    with pytest.raises(StrategyConfigError, match="median"):
        Robust(FedAvg(), "mean")  # type: ignore[arg-type]
    with pytest.raises(StrategyConfigError, match="only once"):
        Robust(Robust(FedAvg()))


# -- differential privacy -----------------------------------------------------------------------------------


def test_dp_wrapper_accounts_twelve_rounds_at_the_exact_epsilon() -> None:
    # σ = 1 for 12 rounds at δ = 1e-5 is ε = 20.125 exactly (analytic Gaussian, see
    # tests/contract/test_accountant.py); the zCDP bound this wrapper used to report was 22.6.
    dp = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, seed=0)
    ids = ["a", "b"]
    dp.initialize({"w": np.zeros(3)}, ids)
    for rnd in range(1, 13):
        tasks = dp.configure_round(rnd, ids)
        assert dp.aggregate(rnd, [make_result(t, {"w": np.ones(3)}, 5) for t in tasks], []) is not None
    assert dp.accountant.steps == 12
    assert dp.epsilon() == pytest.approx(20.125, abs=1e-3)
    assert dp.history[-1].metrics["dp_epsilon"] == dp.epsilon()
    with pytest.raises(StrategyConfigError, match="noise_multiplier"):
        DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=0.0)
    with pytest.raises(StrategyConfigError, match="delta"):
        DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, delta=2.0)


def test_clip_update_scales_to_the_bound() -> None:
    up = {"a": np.array([3.0]), "b": np.array([4.0], dtype=np.float32), "n": np.array(7)}
    out = clip_update(up, 1.0)  # joint norm 5 -> scale 1/5
    assert out["a"][0] == pytest.approx(0.6) and out["b"][0] == pytest.approx(0.8) and int(out["n"]) == 7
    assert clip_update(up, 10.0)["a"][0] == 3.0  # inside the bound: unchanged


def test_dp_wrapper_clips_averages_unweighted_and_adds_calibrated_noise() -> None:
    values = [[3.0, 4.0], [0.3, 0.4]]
    # clip 1: [3,4] (norm 5) -> [0.6, 0.8]; [0.3,0.4] (norm 0.5) unchanged; unweighted mean [0.45, 0.6]
    exact = _one_tensor_round(DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1e-12), values)
    np.testing.assert_allclose(exact["w"], [0.45, 0.6], atol=1e-9)
    # with σ = 2 the noise on the mean has std σ·C/K = 2·1/2 = 1: reproduce it from the same seed
    dp = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=2.0, delta=1e-5, seed=7)
    noisy = _one_tensor_round(dp, values)
    np.testing.assert_allclose(noisy["w"], np.array([0.45, 0.6]) + np.random.default_rng(7).normal(0, 1.0, 2))
    assert dp.accountant.steps == 1
    # one release at σ = 2, δ = 1e-5: the analytic Gaussian ε
    assert dp.history[-1].metrics["dp_epsilon"] == pytest.approx(epsilon_of([GaussianRelease(2.0)], 1e-5))
    assert 1.5 < dp.history[-1].metrics["dp_epsilon"] < 1 / 8 + 2 * math.sqrt(1 / 8 * math.log(1e5))
    with pytest.raises(StrategyConfigError, match="personal"):
        DifferentialPrivacy(PFedNet(), clip_norm=1.0, noise_multiplier=1.0)


def test_dp_noise_has_the_stated_standard_deviation() -> None:
    dp = DifferentialPrivacy(HSL(), clip_norm=0.5, noise_multiplier=1.5, seed=0)
    ids = ["a", "b", "c"]
    dp.initialize({"w": np.zeros(200_000), "steps": np.array(0)}, ids)
    tasks = dp.configure_round(1, ids)
    new = dp.aggregate(1, [make_result(t, {"w": np.zeros(200_000), "steps": 5}, 1) for t in tasks], [])
    assert new is not None
    # std = σ·C/K = 1.5·0.5/3 = 0.25 ; the sample std of 200k draws is within 1% of it
    assert float(np.std(new["w"])) == pytest.approx(0.25, rel=0.01)
    assert int(new["steps"]) == 0  # integer counters do not move under DP


# -- compression --------------------------------------------------------------------------------------------


def test_topk_with_error_feedback_is_exact_over_two_rounds() -> None:
    ef = ErrorFeedback(TopKCompressor(0.5))
    spec = spec_of({"w": np.zeros(4), "n": np.array(0)})
    wire1 = ef.compress({"w": np.array([4.0, -1.0, 0.5, 3.0]), "n": np.array(2)})
    # k = ceil(0.5·4) = 2 largest |.|: indices 0 and 3
    np.testing.assert_array_equal(wire1["w::idx"], [0, 3])
    np.testing.assert_array_equal(wire1["w::val"], [4.0, 3.0])
    sent1 = TopKCompressor(0.5).decompress(wire1, spec)
    np.testing.assert_array_equal(sent1["w"], [4.0, 0.0, 0.0, 3.0])
    assert int(sent1["n"]) == 2
    np.testing.assert_array_equal(ef.residual["w"], [0.0, -1.0, 0.5, 0.0])
    # round 2: [0,-0.5,0.75,0] + residual = [0,-1.5,1.25,0] -> indices 1 and 2, residual back to 0
    wire2 = ef.compress({"w": np.array([0.0, -0.5, 0.75, 0.0]), "n": np.array(0)})
    sent2 = TopKCompressor(0.5).decompress(wire2, spec)
    np.testing.assert_array_equal(sent2["w"], [0.0, -1.5, 1.25, 0.0])
    np.testing.assert_array_equal(ef.residual["w"], np.zeros(4))
    # nothing lost: the two sends add up to the two updates
    np.testing.assert_array_equal(sent1["w"] + sent2["w"], [4.0, -1.5, 1.25, 3.0])


def test_int8_quantisation_by_hand() -> None:
    comp = Int8Compressor()
    x = np.array([127 / 64, -1.0, 0.25, 0.01], dtype=np.float32)
    wire = comp.compress({"x": x})
    # scale = (127/64)/127 = 1/64 ; q = rint([127, -64, 16, 0.64]) = [127, -64, 16, 1]
    assert float(wire["x::scale"]) == 1 / 64
    np.testing.assert_array_equal(wire["x::q"], np.array([127, -64, 16, 1], dtype=np.int8))
    back = comp.decompress(wire, spec_of({"x": x}))["x"]
    np.testing.assert_array_equal(back, np.array([127 / 64, -1.0, 0.25, 1 / 64], dtype=np.float32))
    ef = ErrorFeedback(comp)
    ef.compress({"x": x})
    # only the last entry was off: 0.01 - 1/64 = -0.005625 (in float32 arithmetic of 0.01)
    assert ef.residual["x"][3] == pytest.approx(float(np.float32(0.01)) - 1 / 64)


def test_decompress_refuses_malformed_wire_tensors() -> None:
    spec = spec_of({"w": np.zeros(4)})
    comp = TopKCompressor(0.5)
    wire = comp.compress({"w": np.arange(4.0)})
    with pytest.raises(EncodingError, match="out of range"):
        comp.decompress({**wire, "w::idx": np.array([0, 9])}, spec)
    with pytest.raises(EncodingError, match="unexpected"):
        comp.decompress({**wire, "evil::x": np.zeros(1)}, spec)
    with pytest.raises(EncodingError, match="lacks"):
        comp.decompress({"w::idx": wire["w::idx"]}, spec)
    # at the hub a malformed upload is a PayloadError naming the client
    with pytest.raises(PayloadError, match="client a"):
        decompress_result(ClientResult("a", 1, 3, {**wire, "w::idx": np.array([0, 9])}), comp, spec)
    res = decompress_result(ClientResult("a", 1, 3, wire), comp, spec)
    np.testing.assert_array_equal(res.update["w"], [0.0, 0.0, 2.0, 3.0])


# -- registry -----------------------------------------------------------------------------------------------


def test_registry_builds_every_strategy_by_name() -> None:
    assert available_strategies() == ["fedavg", "fedbn", "fedhelp", "fedprox", "head_avg", "hsl", "pfednet"]
    for name in available_strategies():
        s = make_strategy(name)
        kind = "head_delta" if name == "head_avg" else "weights_delta"
        assert s.name == name and s.update_kind.value == kind
    prox = make_strategy("fedprox", mu=0.5)
    assert prox.shares("bn1.weight") and not make_strategy("fedbn").shares("bn1.weight")
    assert isinstance(make_strategy("fedavg", robust="trimmed_mean", trim_beta=0.2), Robust)
    dp = make_strategy("hsl", dp_clip_norm=1.0, dp_noise_multiplier=1.0)
    assert isinstance(dp, DifferentialPrivacy)
    with pytest.raises(StrategyConfigError, match="unknown strategy"):
        make_strategy("fedsgd")
    with pytest.raises(StrategyConfigError, match="bad settings"):
        make_strategy("fedavg", mu=0.1)
    with pytest.raises(StrategyConfigError, match="both"):
        make_strategy("fedavg", dp_clip_norm=1.0)
