"""Robust aggregation against a poisoned clinic: filter and bound by hand; one of six sign-flipped x10."""

from __future__ import annotations

import numpy as np
import pytest
from fl_helpers import make_result

from hub.fl.aggregate import norm_filtered_mean
from hub.fl.errors import AggregationError, StrategyConfigError
from hub.fl.fedavg import FedAvg
from hub.fl.robust import (
    Robust,
    clip_to_median_norm,
    norm_bounded_mean,
    norm_bounded_trimmed_mean,
    norm_filtered_weighted_mean,
)
from hub.fl.strategy import Params, Strategy


def test_norm_filter_drops_the_update_that_stands_out_by_its_norm() -> None:
    ups = [{"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 5.0])}, {"w": np.array([6.0, 8.0])}]
    # norms 5, 5, 10; median 5; factor 1.5 keeps norms <= 7.5: mean of the first two = [1.5, 4.5]
    np.testing.assert_array_equal(norm_filtered_mean(ups, None, factor=1.5)["w"], [1.5, 4.5])
    # factor 3 keeps all three: [3, 17/3]
    np.testing.assert_allclose(norm_filtered_mean(ups, None, factor=3.0)["w"], [3.0, 17 / 3])
    with pytest.raises(AggregationError, match=">= 1"):
        norm_filtered_mean(ups, None, factor=0.5)
    with pytest.raises(StrategyConfigError, match="norm_factor"):
        Robust(FedAvg(), "norm_filter", norm_factor=0.9)


def test_weighted_norm_filter_keeps_fedavg_weights_of_what_passes() -> None:
    ups = [{"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 5.0])}, {"w": np.array([60.0, 80.0])}]
    # norms 5, 5, 100: the third is dropped; weights 3 and 1 of the first two: [9/4, 17/4]
    np.testing.assert_allclose(norm_filtered_weighted_mean(ups, [3.0, 1.0, 50.0])["w"], [2.25, 4.25])
    # a client that passes the filter cannot push the aggregate past the bound, whatever count it claims
    liar = [*ups[:2], {"w": np.array([-6.0, -8.0])}]  # norm 10 <= 3 × 5
    got = norm_filtered_weighted_mean(liar, [1.0, 1.0, 1e9])["w"]
    assert np.linalg.norm(got) <= 15.0
    with pytest.raises(AggregationError, match="weights"):
        norm_filtered_weighted_mean(ups, [1.0, 1.0])
    with pytest.raises(AggregationError, match=">= 1"):
        norm_filtered_weighted_mean(ups, [1.0, 1.0, 1.0], factor=0.5)


def test_norm_bound_clips_every_update_to_the_median_norm_by_hand() -> None:
    ups = [
        {"w": np.array([3.0, 4.0]), "n": np.array(2)},
        {"w": np.array([0.0, 5.0]), "n": np.array(2)},
        {"w": np.array([60.0, 80.0]), "n": np.array(2)},
    ]
    # norms 5, 5, 100; median 5: the third is scaled by 1/20 to [3, 4], the others and the counters stay
    clipped = clip_to_median_norm(ups)
    np.testing.assert_array_equal(clipped[2]["w"], [3.0, 4.0])
    np.testing.assert_array_equal(clipped[1]["w"], [0.0, 5.0])
    assert all(int(c["n"]) == 2 for c in clipped)
    np.testing.assert_allclose(norm_bounded_mean(ups)["w"], [2.0, 13 / 3])
    # factor 2 bounds at 10: the third becomes [6, 8]
    np.testing.assert_allclose(clip_to_median_norm(ups, 2.0)[2]["w"], [6.0, 8.0])
    # trimmed mean (beta 0.34 of 3 drops one per side) of [3, 0, 3] and [4, 5, 4]: [3, 4]
    np.testing.assert_allclose(norm_bounded_trimmed_mean(ups, beta=0.34)["w"], [3.0, 4.0])
    with pytest.raises(AggregationError, match="positive"):
        clip_to_median_norm(ups, 0.0)
    with pytest.raises(AggregationError, match="non-finite"):
        clip_to_median_norm([*ups, {"w": np.array([np.inf, 0.0]), "n": np.array(2)}])
    with pytest.raises(StrategyConfigError, match="bound_factor"):
        Robust(FedAvg(), "norm_bound", bound_factor=-1.0)
    with pytest.raises(StrategyConfigError, match="beta"):
        Robust(FedAvg(), "norm_bound_trimmed", beta=0.5)


def _round(strategy: Strategy, updates: list[np.ndarray]) -> Params:
    ids = [f"c{i}" for i in range(len(updates))]
    strategy.initialize({"w": np.zeros(updates[0].shape)}, ids)
    tasks = strategy.configure_round(1, ids)
    results = [make_result(t, {"w": u}, 100) for t, u in zip(tasks, updates, strict=True)]
    new = strategy.aggregate(1, results, [])
    assert new is not None
    return new


@pytest.mark.parametrize(
    "robust",
    [
        Robust(FedAvg(), "median"),
        Robust(FedAvg(), "trimmed_mean", beta=0.2),
        Robust(FedAvg(), "norm_filter"),
        Robust(FedAvg(), "norm_filter_weighted"),
        Robust(FedAvg(), "norm_bound"),
        Robust(FedAvg(), "norm_bound_trimmed", beta=0.2),
    ],
    ids=["median", "trimmed_mean", "norm_filter", "norm_filter_weighted", "norm_bound", "norm_bound_trimmed"],
)
def test_one_poisoned_clinic_of_six_does_not_move_a_robust_aggregate(robust: Robust) -> None:
    rng = np.random.default_rng(0)
    direction = rng.normal(size=500)
    honest = [direction + rng.normal(0, 0.3, 500) for _ in range(5)]
    poisoned = -10.0 * honest[0]  # sign-flipped and scaled ×10
    clean = np.mean(honest, axis=0)
    plain = _round(FedAvg(), [*honest, poisoned])["w"]
    got = _round(robust, [*honest, poisoned])["w"]

    def cos(a: np.ndarray) -> float:
        return float(a @ clean / np.linalg.norm(a) / np.linalg.norm(clean))

    # FedAvg is dragged against the honest direction; a robust reduction stays with it
    assert cos(plain) < 0
    assert cos(got) > 0.95
    assert np.linalg.norm(got - clean) < 0.35 * np.linalg.norm(clean)
