"""Exact checks of the aggregation arithmetic against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from hub.fl.aggregate import coordinate_median, trimmed_mean, unweighted_mean, weighted_mean
from hub.fl.errors import AggregationError


def _p(w: list[float], b: float, steps: int = 0) -> dict[str, np.ndarray]:
    return {
        "w": np.array(w, dtype=np.float64),
        "b": np.array([b], dtype=np.float32),
        "n": np.array(steps, dtype=np.int64),
    }


def test_weighted_mean_three_clients_of_different_sizes() -> None:
    a, b, c = _p([1.0, 2.0], 0.5, 10), _p([3.0, -2.0], 1.5, 20), _p([0.0, 4.0], -1.0, 40)
    out = weighted_mean([a, b, c], [10, 30, 60])
    # w[0] = (10*1 + 30*3 + 60*0) / 100 = 100/100 = 1.0
    # w[1] = (10*2 + 30*(-2) + 60*4) / 100 = (20 - 60 + 240)/100 = 2.0
    np.testing.assert_array_equal(out["w"], np.array([1.0, 2.0]))
    # b = (10*0.5 + 30*1.5 + 60*(-1)) / 100 = (5 + 45 - 60)/100 = -0.1 (then float32)
    assert out["b"].dtype == np.float32
    np.testing.assert_array_equal(out["b"], np.array([-0.1], dtype=np.float32))
    # n = (10*10 + 30*20 + 60*40)/100 = (100 + 600 + 2400)/100 = 31 -> integer stays integer
    assert out["n"].dtype == np.int64
    assert int(out["n"]) == 31


def test_weighted_mean_two_clients() -> None:
    out = weighted_mean([_p([2.0, 0.0], 0.0), _p([6.0, 8.0], 1.0)], [1, 3])
    # (1*2 + 3*6)/4 = 5 ; (0 + 3*8)/4 = 6 ; (0 + 3*1)/4 = 0.75
    np.testing.assert_array_equal(out["w"], [5.0, 6.0])
    np.testing.assert_array_equal(out["b"], np.array([0.75], dtype=np.float32))


def test_unweighted_mean_ignores_sizes_and_rounds_integers() -> None:
    out = unweighted_mean([_p([1.0, 2.0], 0.5, 1), _p([3.0, -2.0], 1.5, 2)], [1000, 1])
    # (1+3)/2 = 2, (2-2)/2 = 0, (0.5+1.5)/2 = 1, (1+2)/2 = 1.5 -> rint half-to-even = 2
    np.testing.assert_array_equal(out["w"], [2.0, 0.0])
    np.testing.assert_array_equal(out["b"], np.array([1.0], dtype=np.float32))
    assert int(out["n"]) == 2


def test_median_and_trimmed_mean_resist_one_outlier() -> None:
    vals = [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [1000.0, -1000.0]]
    ps = [{"w": np.array(v)} for v in vals]
    # column 0 sorted: 1 2 3 4 1000 -> median 3 ; column 1 sorted: -1000 10 20 30 40 -> median 20
    np.testing.assert_array_equal(coordinate_median(ps)["w"], [3.0, 20.0])
    # beta=0.2, K=5 -> drop floor(1.0)=1 from each end: mean(2,3,4)=3 ; mean(10,20,30)=20
    np.testing.assert_array_equal(trimmed_mean(ps, beta=0.2)["w"], [3.0, 20.0])
    # beta=0 is the plain mean: (1+2+3+4+1000)/5 = 202
    assert trimmed_mean(ps, beta=0.0)["w"][0] == 202.0
    # even count: median of 1,2,3,4 = 2.5
    assert coordinate_median(ps[:4])["w"][0] == 2.5


def test_trimmed_mean_rejects_beta_out_of_range() -> None:
    with pytest.raises(AggregationError, match="beta"):
        trimmed_mean([{"w": np.zeros(1)}], beta=0.5)


@pytest.mark.parametrize(
    ("other", "match"),
    [
        ({"w": np.zeros(2), "b": np.zeros(1, dtype=np.float32), "x": np.zeros(1)}, "names"),
        ({"w": np.zeros(3), "b": np.zeros(1, dtype=np.float32), "n": np.array(0)}, "shape"),
        ({"w": np.zeros(2, dtype=np.float32), "b": np.zeros(1, dtype=np.float32), "n": np.array(0)}, "dtype"),
    ],
)
def test_mismatched_tensors_raise_a_clear_error(other: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(AggregationError, match=match):
        weighted_mean([_p([0.0, 0.0], 0.0), other], [1, 1])


def test_weights_must_be_usable() -> None:
    with pytest.raises(AggregationError, match="sum to zero"):
        weighted_mean([_p([0.0, 0.0], 0.0)], [0])
    with pytest.raises(AggregationError, match="non-negative"):
        weighted_mean([_p([0.0, 0.0], 0.0)], [-1])
    with pytest.raises(AggregationError, match="nothing"):
        unweighted_mean([])
