"""Robust aggregation against a poisoned clinic: norm filtering by hand, and one of six sign-flipped ×10."""

from __future__ import annotations

import numpy as np
import pytest
from fl_helpers import make_result

from hub.fl.aggregate import norm_filtered_mean
from hub.fl.errors import AggregationError, StrategyConfigError
from hub.fl.fedavg import FedAvg
from hub.fl.robust import Robust
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
    ],
    ids=["median", "trimmed_mean", "norm_filter"],
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
