"""head_avg: the hub's side of head_delta rounds (shared head out, weighted mean of head deltas in)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.protocol.updates import UpdateKind
from hub.fl.errors import StrategyConfigError
from hub.fl.registry import make_strategy
from hub.fl.strategy import ClientResult
from hub.rounds.plan import build_plan


def _student() -> dict[str, np.ndarray]:
    """A student state dict: a conv backbone and a one-logit head on a 4-dim embedding."""
    return {
        "features.0.0.weight": np.ones((4, 1, 3, 3), np.float32),
        "features.0.1.running_mean": np.zeros(4, np.float32),
        "head.fc.weight": np.arange(4, dtype=np.float32).reshape(1, 4),
        "head.fc.bias": np.array([0.5], np.float32),
    }


def test_only_the_head_travels_and_deltas_are_weighted_by_examples() -> None:
    s = make_strategy("head_avg")
    s.initialize(_student(), ["a", "b"])
    assert s.update_kind is UpdateKind.HEAD_DELTA
    tasks = s.configure_round(1, ["a", "b"])
    assert {t.kind for t in tasks} == {UpdateKind.HEAD_DELTA}
    assert sorted(tasks[0].params) == ["head.fc.bias", "head.fc.weight"]
    da = {"head.fc.weight": np.ones((1, 4), np.float32), "head.fc.bias": np.array([1.0], np.float32)}
    db = {"head.fc.weight": -np.ones((1, 4), np.float32), "head.fc.bias": np.array([-1.0], np.float32)}
    new = s.aggregate(1, [ClientResult("a", 1, 30, da), ClientResult("b", 1, 10, db)], [])
    assert new is not None and sorted(new) == ["head.fc.bias", "head.fc.weight"]
    # (30·1 + 10·(−1)) / 40 = 0.5 on every entry.
    np.testing.assert_allclose(new["head.fc.weight"], np.arange(4).reshape(1, 4) + 0.5)
    np.testing.assert_allclose(new["head.fc.bias"], [1.0])
    # A node that sends a tensor of the backbone is rejected, not folded.
    bad = {**da, "features.0.0.weight": np.zeros((4, 1, 3, 3), np.float32)}
    s.configure_round(2, ["a"])
    assert s.aggregate(2, [ClientResult("a", 2, 5, bad)], []) is None


def test_state_dict_round_trips_through_the_round_plan() -> None:
    plan = build_plan("head_avg", {"client.epochs": 5}, _student(), ["a"])
    assert plan.kind is UpdateKind.HEAD_DELTA
    (task,) = plan.tasks(1, ["a"])
    assert task.config == {"epochs": 5}
    assert {n: s.shape for n, s in task.expected.items()} == {"head.fc.weight": (1, 4), "head.fc.bias": (1,)}
    delta = {"head.fc.weight": np.full((1, 4), 2.0, np.float32), "head.fc.bias": np.array([0.0], np.float32)}
    new, reason = plan.aggregate(1, [ClientResult("a", 1, 7, delta)], [])
    assert reason is None and new is not None
    state = plan.state()
    assert state is not None
    again = build_plan("head_avg", {}, state, ["a"])
    (task2,) = again.tasks(2, ["a"])
    np.testing.assert_allclose(task2.params["head.fc.weight"], np.arange(4).reshape(1, 4) + 2.0)


def test_a_start_without_one_linear_head_is_refused_with_the_fix() -> None:
    student = _student()
    with pytest.raises(StrategyConfigError, match="head=WEIGHT,BIAS"):
        make_strategy("head_avg").initialize({"head.fc.weight": student["head.fc.weight"]}, ["a"])
    with pytest.raises(StrategyConfigError, match=r"hold no \['fc\.weight', 'fc\.bias'\]"):
        make_strategy("head_avg", head="fc.weight,fc.bias").initialize(student, ["a"])
    named = make_strategy("head_avg", head="features.0.1.running_mean,head.fc.bias")
    with pytest.raises(StrategyConfigError, match="one float weight"):
        named.initialize(student, ["a"])
