"""FedAvg, FedProx and FedBN against hand-computed rounds; validation turns bad updates into failures."""

from __future__ import annotations

import numpy as np
import pytest
from fl_helpers import make_result

from hub.fl.errors import StrategyConfigError
from hub.fl.fedavg import FedAvg
from hub.fl.fedbn import FedBN, is_norm_tensor
from hub.fl.fedprox import FedProx
from hub.fl.strategy import ClientFailure, Params

NAMES = ["conv.weight", "bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "fc.bias"]


def _deltas(c: float, bn: float, steps: int, fc: float) -> dict[str, object]:
    return {
        "conv.weight": [c, -c],
        "bn1.weight": [bn],
        "bn1.running_mean": [bn],
        "bn1.num_batches_tracked": steps,
        "fc.bias": [fc],
    }


def test_fedavg_applies_sample_weighted_delta_to_global(tiny_model: Params) -> None:
    s = FedAvg()
    s.initialize(tiny_model, ["a", "b", "c"])
    tasks = s.configure_round(1, ["a", "b"])
    assert [t.client_id for t in tasks] == ["a", "b"]
    assert sorted(tasks[0].params) == sorted(NAMES)
    ra = make_result(tasks[0], _deltas(1.0, 0.5, 10, 0.25), num_examples=100)
    rb = make_result(tasks[1], _deltas(-2.0, 1.0, 30, -0.5), num_examples=300)
    new = s.aggregate(1, [ra, rb], [])
    assert new is not None
    # mean conv delta = (100*1 + 300*(-2))/400 = -500/400 = -1.25 -> [1-1.25, 2+1.25] = [-0.25, 3.25]
    np.testing.assert_array_equal(new["conv.weight"], [-0.25, 3.25])
    # bn delta = (100*0.5 + 300*1)/400 = 350/400 = 0.875 -> weight 1.875, running_mean 0.875
    np.testing.assert_array_equal(new["bn1.weight"], [1.875])
    np.testing.assert_array_equal(new["bn1.running_mean"], [0.875])
    # steps = (100*10 + 300*30)/400 = 10000/400 = 25
    assert int(new["bn1.num_batches_tracked"]) == 25
    # fc = 0.5 + (100*0.25 + 300*(-0.5))/400 = 0.5 - 125/400 = 0.5 - 0.3125 = 0.1875
    np.testing.assert_array_equal(new["fc.bias"], [0.1875])
    # the global state is the returned one, and tasks of the next round start from it
    np.testing.assert_array_equal(s.global_params["fc.bias"], [0.1875])
    np.testing.assert_array_equal(s.configure_round(2, ["c"])[0].params["conv.weight"], [-0.25, 3.25])
    rec = s.history[-1]
    assert rec.accepted == ("a", "b") and rec.applied and rec.metrics["num_examples"] == 400.0
    with pytest.raises(StrategyConfigError, match="already aggregated"):
        s.aggregate(1, [ra, rb], [])


def test_fedavg_server_learning_rate_scales_the_step(tiny_model: Params) -> None:
    s = FedAvg(server_lr=0.5)
    s.initialize(tiny_model, ["a"])
    (t,) = s.configure_round(1, ["a"])
    new = s.aggregate(1, [make_result(t, _deltas(2.0, 0.0, 4, 1.0), 7)], [])
    assert new is not None
    # conv = [1, 2] + 0.5*[2, -2] = [2, 1] ; fc = 0.5 + 0.5*1 = 1.0 ; integer counter moves by 4 (no lr)
    np.testing.assert_array_equal(new["conv.weight"], [2.0, 1.0])
    np.testing.assert_array_equal(new["fc.bias"], [1.0])
    assert int(new["bn1.num_batches_tracked"]) == 4


def test_tasks_hold_copies_so_a_client_cannot_change_the_global(tiny_model: Params) -> None:
    s = FedAvg()
    s.initialize(tiny_model, ["a"])
    (t,) = s.configure_round(1, ["a"])
    t.params["conv.weight"][:] = 99.0
    tiny_model["fc.bias"][:] = 99.0
    np.testing.assert_array_equal(s.global_params["conv.weight"], [1.0, 2.0])
    np.testing.assert_array_equal(s.global_params["fc.bias"], [0.5])


def test_fedprox_sends_mu_and_aggregates_like_fedavg(tiny_model: Params) -> None:
    s = FedProx(mu=0.1, client_config={"local_epochs": 2})
    s.initialize(tiny_model, ["a", "b"])
    ta, tb = s.configure_round(1, ["a", "b"])
    assert ta.config == {"local_epochs": 2, "mu": 0.1}
    new = s.aggregate(
        1, [make_result(ta, _deltas(1.0, 0, 0, 0), 1), make_result(tb, _deltas(5.0, 0, 0, 0), 3)], []
    )
    assert new is not None
    # (1*1 + 3*5)/4 = 4 -> [1+4, 2-4]
    np.testing.assert_array_equal(new["conv.weight"], [5.0, -2.0])
    with pytest.raises(StrategyConfigError, match="mu"):
        FedProx(mu=-1.0)


def test_norm_predicate_matches_bn_conventions() -> None:
    for name in ["layer1.0.bn1.weight", "features.norm5.bias", "enc.layernorm.weight", "x.running_var"]:
        assert is_norm_tensor(name), name
    for name in ["conv1.weight", "fc.bias", "features.denseblock1.conv1.weight", "normal_head.weight"]:
        assert not is_norm_tensor(name), name
    assert is_norm_tensor("m.num_batches_tracked") and is_norm_tensor("downsample_bn.bias")


def test_fedbn_keeps_bn_local(tiny_model: Params) -> None:
    s = FedBN()
    s.initialize(tiny_model, ["a", "b"])
    ta, tb = s.configure_round(1, ["a", "b"])
    shared = ["conv.weight", "fc.bias"]
    # BN tensors are never sent to a client ...
    assert sorted(ta.params) == shared and sorted(s.global_params) == shared
    assert not s.shares("bn1.running_mean") and s.shares("conv.weight")
    # ... a client's own BN values survive: simulate client a's local model, merged with the aggregate
    local_a = {"bn1.weight": np.array([3.0]), "bn1.running_mean": np.array([-7.0])}
    ra = make_result(ta, {"conv.weight": [2.0, 2.0], "fc.bias": [1.0]}, 1)
    rb = make_result(tb, {"conv.weight": [6.0, -2.0], "fc.bias": [-1.0]}, 1)
    new = s.aggregate(1, [ra, rb], [])
    assert new is not None
    # ... and BN tensors are never in the aggregate
    assert sorted(new) == shared
    # conv = [1,2] + ([2,2]+[6,-2])/2 = [1,2] + [4,0] = [5,2] ; fc = 0.5 + 0 = 0.5
    np.testing.assert_array_equal(new["conv.weight"], [5.0, 2.0])
    np.testing.assert_array_equal(new["fc.bias"], [0.5])
    model_a = {**local_a, **s.params_for("a")}
    np.testing.assert_array_equal(model_a["bn1.running_mean"], [-7.0])
    # an update that carries BN tensors is rejected: it is not what the task asked for
    (t2,) = s.configure_round(2, ["a"])
    bad = make_result(t2, {"conv.weight": [0, 0], "fc.bias": [0]}, 1)
    bad.update["bn1.weight"] = np.array([1.0])
    assert s.aggregate(2, [bad], []) is None
    assert "unexpected ['bn1.weight']" in s.history[-1].failures[0].reason


def test_fedbn_with_a_custom_predicate(tiny_model: Params) -> None:
    s = FedBN(is_local=lambda n: n.startswith("fc."))
    s.initialize(tiny_model, ["a"])
    assert "fc.bias" not in s.global_params and "bn1.weight" in s.global_params


def test_broken_updates_become_failures_with_reasons(tiny_model: Params) -> None:
    s = FedAvg(max_norm=10.0)
    s.initialize(tiny_model, ["ok", "nan", "shape", "norm", "names", "late"])
    tasks = {t.client_id: t for t in s.configure_round(3, ["ok", "nan", "shape", "norm", "names"])}
    good = make_result(tasks["ok"], _deltas(1.0, 0.0, 0, 0.0), 10)
    nan = make_result(tasks["nan"], _deltas(float("nan"), 0.0, 0, 0.0), 10)
    shape = make_result(tasks["shape"], _deltas(1.0, 0.0, 0, 0.0), 10)
    shape.update["conv.weight"] = np.zeros(3)
    norm = make_result(tasks["norm"], _deltas(100.0, 0.0, 0, 0.0), 10)
    names = make_result(tasks["names"], _deltas(1.0, 0.0, 0, 0.0), 10)
    del names.update["fc.bias"]
    late = make_result(tasks["ok"], _deltas(1.0, 0.0, 0, 0.0), 10)
    late = type(late)("late", 3, 10, late.update)
    timeout = ClientFailure("x", 3, "timeout")
    new = s.aggregate(3, [good, nan, shape, norm, names, late], [timeout])
    assert new is not None
    # only "ok" counted: conv = [1,2] + [1,-1] = [2,1]
    np.testing.assert_array_equal(new["conv.weight"], [2.0, 1.0])
    reasons = {f.client_id: f.reason for f in s.history[-1].failures}
    assert reasons["x"] == "timeout"
    assert "NaN" in reasons["nan"]
    assert "shape (3,), expected (2,)" in reasons["shape"]
    # norm of [100, -100] = 141.4 > 10
    assert "L2 norm 141.4 exceeds the bound 10" in reasons["norm"]
    assert "missing ['fc.bias']" in reasons["names"]
    assert "not asked" in reasons["late"]


def test_all_clients_failed_keeps_the_model(tiny_model: Params) -> None:
    s = FedAvg()
    s.initialize(tiny_model, ["a", "b"])
    ta, tb = s.configure_round(1, ["a", "b"])
    bad = make_result(ta, _deltas(float("inf"), 0.0, 0, 0.0), 5)
    empty = make_result(tb, _deltas(1.0, 0.0, 0, 0.0), 0)
    assert s.aggregate(1, [bad], [ClientFailure("b", 1, "timeout")]) is None
    assert s.aggregate(1, [empty], []) is None
    assert "0 examples" in s.history[-1].failures[0].reason
    assert not s.history[-1].applied
    np.testing.assert_array_equal(s.global_params["conv.weight"], [1.0, 2.0])


def test_min_results_and_wrong_round(tiny_model: Params) -> None:
    s = FedAvg(min_results=2)
    s.initialize(tiny_model, ["a", "b"])
    ta, _ = s.configure_round(1, ["a", "b"])
    assert s.aggregate(1, [make_result(ta, _deltas(1.0, 0, 0, 0), 1)], []) is None
    with pytest.raises(StrategyConfigError, match="never configured"):
        s.aggregate(7, [], [])
    with pytest.raises(StrategyConfigError, match="initialize"):
        FedAvg().configure_round(1, ["a"])
