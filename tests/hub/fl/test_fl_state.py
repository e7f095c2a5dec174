"""Strategy state round trips (through the stored bytes) and what the capability flags let wrappers do."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from fl_helpers import make_result

from edge_node.protocol.updates import UpdateKind
from hub.fl.errors import StrategyConfigError
from hub.fl.fedavg import FedAvg
from hub.fl.fedbn import FedBN
from hub.fl.fedhelp import FedHelp
from hub.fl.fedprox import FedProx
from hub.fl.hsl import HSL
from hub.fl.pfednet import PFedNet
from hub.fl.privacy import DifferentialPrivacy
from hub.fl.robust import Robust
from hub.fl.state import state_from_bytes, state_to_bytes
from hub.fl.strategy import Capability, ClientResult, ClientTask, Params, Strategy

CLIENTS = ["c0", "c1", "c2", "c3"]

#: Every shipped strategy and wrapper, built the same way twice (settings are not part of the state).
FACTORIES: dict[str, Callable[[], Strategy]] = {
    "fedavg": lambda: FedAvg(server_lr=0.5),
    "fedprox": lambda: FedProx(mu=0.1),
    "fedbn": FedBN,
    "hsl": HSL,
    "fedhelp": lambda: FedHelp(large_clients=["c0"]),
    "pfednet": lambda: PFedNet(lam=0.5, eta=0.1, graph_k=1),
    "pfednet_edges": lambda: PFedNet(lam=0.5, eta=0.1, edges=[("c0", "c1"), ("c2", "c3")]),
    "robust_median": lambda: Robust(FedAvg(), "median"),
    "robust_pfednet": lambda: Robust(PFedNet(lam=0.5, eta=0.1, graph_k=1), "trimmed_mean", beta=0.25),
    "dp_hsl": lambda: DifferentialPrivacy(HSL(), clip_norm=1.0, noise_multiplier=0.5, seed=3),
}


def _model() -> Params:
    return {
        "conv.weight": np.array([1.0, 2.0, -1.0], dtype=np.float32),
        "bn1.weight": np.array([1.0], dtype=np.float64),
        "bn1.num_batches_tracked": np.array(0, dtype=np.int64),
        "public_head.weight": np.array([0.1, 0.2], dtype=np.float32),
        "fc.bias": np.array([0.5, -0.5], dtype=np.float64),
    }


def _answer(task: ClientTask, rng: np.random.Generator) -> ClientResult:
    """A deterministic client: label counts for a stats task, a random delta of the task's tensors else."""
    if task.kind is UpdateKind.STATS:
        counts = rng.integers(0, 50, size=3).astype(np.float64)
        return ClientResult(task.client_id, task.round, int(counts.sum()), {"label_counts": counts})
    delta = {
        name: (
            rng.integers(0, 3, size=arr.shape) if arr.dtype.kind in "iu" else rng.normal(0, 0.3, arr.shape)
        )
        for name, arr in task.params.items()
    }
    return make_result(task, delta, int(rng.integers(1, 40)), {"val_auc": float(rng.uniform(0.5, 1.0))})


def _round(strategy: Strategy, rnd: int, seed: int) -> Params | None:
    rng = np.random.default_rng(seed)
    tasks = strategy.configure_round(rnd, CLIENTS[:3] if rnd % 2 else CLIENTS)
    return strategy.aggregate(rnd, [_answer(t, rng) for t in tasks], [])


def _assert_same_params(a: Params, b: Params) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])


def _assert_same(a: Strategy, b: Strategy) -> None:
    _assert_same_params(a.global_params, b.global_params)
    for cid in CLIENTS:
        _assert_same_params(a.params_for(cid), b.params_for(cid))
    assert list(a.history) == list(b.history)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_state_dict_round_trips_through_bytes_and_the_copy_carries_on_identically(kind: str) -> None:
    original = FACTORIES[kind]()
    original.initialize(_model(), CLIENTS)
    _round(original, 1, seed=1)
    _round(original, 2, seed=2)
    # Round 3 is configured but not aggregated: the saved state must be able to finish it.
    rng = np.random.default_rng(3)
    results = [_answer(t, rng) for t in original.configure_round(3, CLIENTS)]

    state = original.state_dict()
    for key, value in state.items():
        assert isinstance(value, np.ndarray) or json.loads(json.dumps(value)) == value, key
    copy = FACTORIES[kind]()
    copy.load_state_dict(state_from_bytes(state_to_bytes(state)))
    _assert_same(original, copy)

    a, b = original.aggregate(3, results, []), copy.aggregate(3, results, [])
    assert a is not None and b is not None
    _assert_same_params(a, b)
    for rnd in (4, 5):
        _round(original, rnd, seed=rnd)
        _round(copy, rnd, seed=rnd)
    _assert_same(original, copy)
    assert len(original.history) == 5


def test_a_restored_strategy_keeps_what_its_kind_tracks() -> None:
    pfed = PFedNet(lam=0.5, eta=0.1, graph_k=1)
    pfed.initialize(_model(), CLIENTS)
    assert _round(pfed, 1, seed=1) is None  # the stats round builds the graph
    copy_p = PFedNet(lam=0.5, eta=0.1, graph_k=1)
    copy_p.load_state_dict(state_from_bytes(state_to_bytes(pfed.state_dict())))
    assert pfed.graph is not None and copy_p.graph is not None
    assert copy_p.graph.edges == pfed.graph.edges
    np.testing.assert_array_equal(copy_p.graph.incidence, pfed.graph.incidence)
    np.testing.assert_array_equal(copy_p.graph.distances, pfed.graph.distances)

    dp = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, seed=5)
    dp.initialize(_model(), CLIENTS)
    _round(dp, 1, seed=1)
    _round(dp, 2, seed=2)
    copy_dp = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, seed=99)
    copy_dp.load_state_dict(state_from_bytes(state_to_bytes(dp.state_dict())))
    assert copy_dp.accountant.steps == 2 and copy_dp.epsilon() == dp.epsilon()
    # Unseeded (production) noise never reaches the stored state: it could be predicted from it.
    live = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1.0)
    live.initialize(_model(), CLIENTS)
    _round(live, 1, seed=1)
    assert live.state_dict()["rng"] is None


def test_a_state_is_refused_by_another_kind_of_strategy_and_when_damaged() -> None:
    fedavg = FedAvg()
    fedavg.initialize(_model(), CLIENTS)
    state = fedavg.state_dict()
    with pytest.raises(StrategyConfigError, match="saved by strategy 'fedavg'"):
        HSL().load_state_dict(state)
    with pytest.raises(StrategyConfigError, match="saved by strategy 'fedavg'"):
        Robust(FedAvg()).load_state_dict(state)
    with pytest.raises(StrategyConfigError, match="'clients'"):
        FedAvg().load_state_dict({k: v for k, v in state.items() if k != "clients"})
    with pytest.raises(StrategyConfigError, match="'history' is malformed"):
        FedAvg().load_state_dict({**state, "history": "not a list"})
    with pytest.raises(StrategyConfigError, match="unreadable"):
        state_from_bytes(b"not an npz")
    with pytest.raises(StrategyConfigError, match="call initialize"):
        FedAvg().state_dict()


def test_capabilities_decide_what_a_wrapper_may_wrap_and_wrapping_changes_nothing_inside() -> None:
    assert Capability.REPLACEABLE_MEAN in FedAvg().capabilities
    assert PFedNet().capabilities == Capability.REPLACEABLE_MEAN | Capability.PERSONAL_STATE
    robust_pfed = Robust(PFedNet(), "median")
    # the wrapper passes on what it does not use up: a second wrapper cannot replace the mean again
    assert robust_pfed.capabilities == Capability.PERSONAL_STATE
    with pytest.raises(StrategyConfigError, match="only once"):
        DifferentialPrivacy(Robust(FedAvg()), clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(StrategyConfigError, match="personal parts"):
        DifferentialPrivacy(PFedNet(), clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(StrategyConfigError, match="not a mean"):
        robust_pfed.aggregate_with(1, [], [], lambda updates, weights: updates[0])

    # The inner strategy, used on its own, still takes its weighted mean: the wrapper patched nothing.
    inner = FedAvg()
    Robust(inner, "median")
    inner.initialize({"w": np.zeros(1)}, ["a", "b", "c"])
    tasks = inner.configure_round(1, ["a", "b", "c"])
    answers = zip(tasks, [1, 2, 9], [1, 1, 2], strict=True)
    new = inner.aggregate(1, [make_result(t, {"w": [v]}, n) for t, v, n in answers], [])
    assert new is not None and new["w"][0] == pytest.approx((1 + 2 + 18) / 4)
