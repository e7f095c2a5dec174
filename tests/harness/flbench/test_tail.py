"""Tail averaging: the mean of the last rounds' models, and what a tail-averaged federation deploys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.flbench.tail import TailMean
from hub.models.fl_cnn import fl_cnn
from hub.training.learners import load_params, to_params


def _params(value: float, step: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 3), value, dtype=np.float32),
        "steps": np.array(step, dtype=np.int64),
    }


def test_the_mean_takes_only_the_last_rounds_and_keeps_integer_tensors_from_the_last() -> None:
    tail = TailMean(last=6, rounds=3)
    for rnd in range(1, 7):
        tail.offer(rnd, _params(float(rnd), rnd * 10))
    mean = tail.mean()
    assert tail.rounds == [4, 5, 6]
    np.testing.assert_allclose(mean["w"], np.full((2, 3), 5.0))  # (4 + 5 + 6) / 3, not (1 + ... + 6) / 6
    assert mean["w"].dtype == np.float32
    assert int(mean["steps"]) == 60 and mean["steps"].dtype == np.int64


def test_the_distances_say_how_far_the_tail_still_moves_over_the_float_tensors_only() -> None:
    tail = TailMean(last=6, rounds=3)
    for rnd in range(1, 7):
        tail.offer(rnd, _params(float(rnd), rnd * 1000))  # the integer counter would dwarf the weights
    far = tail.distances()
    root6 = np.sqrt(6.0)  # six weights, each 1 apart from round to round
    assert far["steps"] == pytest.approx([root6, root6])  # rounds 4→5 and 5→6: nothing before the tail
    assert far["mean_to_last"] == pytest.approx(root6)  # the mean (5) one round's step behind the last (6)
    assert far["last_norm"] == pytest.approx(6.0 * root6)


def test_the_mean_does_not_alias_what_it_was_offered() -> None:
    tail = TailMean(last=2, rounds=2)
    first = _params(1.0, 1)
    tail.offer(1, first)
    first["w"][:] = 100.0  # the strategy reuses its arrays in the next round
    tail.offer(2, _params(3.0, 2))
    np.testing.assert_allclose(tail.mean()["w"], 2.0)


def test_a_replayed_or_missing_round_is_an_error() -> None:
    tail = TailMean(last=4, rounds=2)
    tail.offer(3, _params(1.0, 3))
    with pytest.raises(ValueError, match="round 3 offered twice"):
        tail.offer(3, _params(1.0, 3))
    with pytest.raises(ValueError, match=r"lacks rounds \[4\]"):
        tail.mean()
    with pytest.raises(ValueError, match="at least one round"):
        TailMean(last=4, rounds=0)


def test_a_tail_longer_than_the_run_averages_every_round() -> None:
    tail = TailMean(last=2, rounds=4)
    tail.offer(1, _params(1.0, 1))
    tail.offer(2, _params(2.0, 2))
    np.testing.assert_allclose(tail.mean()["w"], 1.5)


def test_the_mean_of_real_group_norm_models_loads_and_predicts_between_them() -> None:
    torch.manual_seed(0)
    models = [fl_cnn(norm="group", num_outputs=1) for _ in range(3)]
    tail = TailMean(last=3, rounds=3)
    for rnd, model in enumerate(models, start=1):
        tail.offer(rnd, to_params(model))
    averaged = fl_cnn(norm="group", num_outputs=1)
    load_params(averaged, tail.mean())
    for name, tensor in averaged.state_dict().items():
        stacked = torch.stack([m.state_dict()[name] for m in models])
        torch.testing.assert_close(tensor, stacked.mean(dim=0))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.isfinite(averaged(x)).all()
