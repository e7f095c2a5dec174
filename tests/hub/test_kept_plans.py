"""The ``kept_tensors`` collection: the hub asks each node for the tensors a strategy left at it (FedBN's
normalisation tensors, pFedNet's BatchNorm statistics), averages them as the simulation averages an unseen
clinic's, keeps each node's own copy, and refuses answers no real model could hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_node.protocol.tensors import decode_tensors, encode_tensors
from edge_node.protocol.updates import UpdateKind
from hub.fl.aggregate import weighted_mean
from hub.fl.errors import StrategyConfigError
from hub.fl.fedbn import is_norm_buffer, is_norm_tensor, kept_at_nodes
from hub.fl.pfednet import PFedNet
from hub.fl.registry import make_strategy
from hub.fl.strategy import ClientResult, Params
from hub.models.registry import create_model
from hub.rounds.answer_checks import answer_problem
from hub.rounds.kept_plans import KeptTensorsCollection, mean_part, node_part, trained_rounds
from hub.rounds.plan import build_plan
from hub.training.learners import to_params

pytestmark = pytest.mark.hub

NODES = ["n-a", "n-b", "n-c"]


def _start(norm: str = "batch") -> Params:
    torch.manual_seed(0)
    return to_params(create_model("fl_cnn", norm=norm))


def _answer(
    plan: KeptTensorsCollection, node: str, seed: int, examples: int, trained: float | None = None
) -> ClientResult:
    rng = np.random.default_rng(seed)
    update = {}
    for name, spec in plan.expected.items():
        if spec.dtype.kind == "f":
            update[name] = rng.uniform(0.1, 2.0, spec.shape).astype(spec.dtype)
        else:
            update[name] = np.full(spec.shape, 10 * seed, dtype=spec.dtype)
    return ClientResult(node, 4, examples, update, {} if trained is None else {"trained_round": trained})


@pytest.mark.parametrize(
    ("kept", "picks"), [("norm_tensors", is_norm_tensor), ("norm_buffers", is_norm_buffer)]
)
def test_the_tasks_ask_for_the_kept_tensors_of_the_student_and_send_nothing(kept: str, picks: object) -> None:
    start = _start()
    plan = build_plan("kept_tensors", {"kept": kept}, start, NODES)
    assert isinstance(plan, KeptTensorsCollection) and plan.kind is UpdateKind.KEPT_TENSORS
    want = sorted(n for n in start if picks(n))  # type: ignore[operator]
    assert want and sorted(plan.expected) == want
    assert any(n.endswith("running_var") for n in want)
    for task in plan.tasks(4, NODES):
        assert task.params == {} and task.config == {"kept": kept}
        assert {n: (s.shape, s.dtype) for n, s in task.expected.items()} == {
            n: (start[n].shape, start[n].dtype) for n in want
        }


def test_the_aggregate_is_the_example_weighted_mean_with_every_node_s_own_copy() -> None:
    plan = build_plan("kept_tensors", {}, _start(), NODES)
    assert isinstance(plan, KeptTensorsCollection)
    answers = [
        _answer(plan, n, k + 1, examples, trained)
        for k, (n, examples, trained) in enumerate(zip(NODES, (96, 48, 24), (3.0, 3.0, None), strict=True))
    ]
    aggregate, reason = plan.aggregate(4, answers, [])
    assert reason is None and aggregate is not None
    aggregate = decode_tensors(encode_tensors(aggregate))  # the hub stores it as an artifact
    mean = mean_part(aggregate)
    want = weighted_mean([a.update for a in answers], [96, 48, 24])
    assert sorted(mean) == sorted(plan.expected)
    for name, arr in want.items():
        np.testing.assert_array_equal(mean[name], arr, err_msg=name)
        assert mean[name].dtype == plan.expected[name].dtype
    counter = next(n for n in plan.expected if n.endswith("num_batches_tracked"))
    assert int(mean[counter]) == round((10 * 96 + 20 * 48 + 30 * 24) / 168)
    for answer in answers:
        own = node_part(aggregate, answer.client_id)
        assert sorted(own) == sorted(plan.expected)
        for name, arr in answer.update.items():
            np.testing.assert_array_equal(own[name], arr)
    assert node_part(aggregate, "n-z") == {}
    # Which round last trained each learner, for those that said: from-round names the others.
    assert trained_rounds(aggregate) == {"n-a": 3, "n-b": 3}
    # What a node says about its round is only taken when it can be one.
    for said in (1e300, -1.0, 2.5, math.inf, math.nan):
        odd = plan.aggregate(4, [_answer(plan, "n-a", 1, 10, said)], [])[0]
        assert odd is not None and trained_rounds(odd) == {}, said
    assert int(aggregate["nodes"]) == 3
    # Nodes that report no examples count alike; no answer at all keeps nothing.
    equal, _ = plan.aggregate(4, [_answer(plan, n, k + 1, 0) for k, n in enumerate(NODES)], [])
    assert equal is not None
    np.testing.assert_array_equal(mean_part(equal)[counter], np.array(20, dtype=plan.expected[counter].dtype))
    assert plan.aggregate(4, [], []) == (None, "no node sent what it kept")


def test_robust_median_keeps_one_loud_node_from_the_nodes_mean() -> None:
    start = _start()
    plan = build_plan("kept_tensors", {"kept": "norm_buffers"}, start, NODES)
    assert isinstance(plan, KeptTensorsCollection)
    honest = [_answer(plan, n, k + 1, 50) for k, n in enumerate(NODES)]
    var = next(n for n in plan.expected if n.endswith("running_var"))
    # A fourth node claims a thousand times the images and statistics a million times wider: finite and
    # non-negative, so intake takes it; the example-weighted mean follows it, the median does not.
    loud = _answer(plan, "n-d", 1, 50_000)
    loud = ClientResult("n-d", 4, loud.num_examples, {**loud.update, var: loud.update[var] * 1e6})
    assert answer_problem(UpdateKind.KEPT_TENSORS.value, loud.update) is None
    plain, _ = plan.aggregate(4, [*honest, loud], [])
    robust_plan = build_plan("kept_tensors", {"kept": "norm_buffers", "robust": "median"}, start, NODES)
    robust, reason = robust_plan.aggregate(4, [*honest, loud], [])
    assert reason is None and plain is not None and robust is not None
    honest_var = np.stack([a.update[var] for a in honest])
    assert np.all(mean_part(plain)[var] > 1e3 * honest_var.max(axis=0))
    assert np.all(mean_part(robust)[var] <= honest_var.max(axis=0))
    assert np.all(mean_part(robust)[var] >= honest_var.min(axis=0))
    counter = next(n for n in plan.expected if n.endswith("num_batches_tracked"))
    assert int(mean_part(robust)[counter]) == 15  # the median of 10, 20, 30 and 10, example counts ignored
    np.testing.assert_array_equal(node_part(robust, "n-d")[var], loud.update[var])  # its copy stays its own


def test_a_round_that_could_collect_nothing_is_refused_at_the_start() -> None:
    with pytest.raises(StrategyConfigError, match="choose one of"):
        build_plan("kept_tensors", {"kept": "weights"}, _start(), NODES)
    with pytest.raises(StrategyConfigError, match="reduce by 'median'"):
        build_plan("kept_tensors", {"robust": "trimmed_mean"}, _start(), NODES)
    with pytest.raises(StrategyConfigError, match=r"unknown settings \['reduce'\]"):
        build_plan("kept_tensors", {"reduce": "median"}, _start(), NODES)
    # fl_cnn on GroupNorm has norm affines but no running statistics.
    with pytest.raises(StrategyConfigError, match="hold none that norm_buffers"):
        build_plan("kept_tensors", {"kept": "norm_buffers"}, _start("group"), NODES)
    without_norms = {k: v for k, v in _start().items() if not is_norm_tensor(k)}
    with pytest.raises(StrategyConfigError, match="hold none that norm_tensors"):
        build_plan("kept_tensors", {}, without_norms, NODES)


def test_answers_no_model_could_hold_are_refused_at_intake() -> None:
    plan = build_plan("kept_tensors", {}, _start(), NODES)
    assert isinstance(plan, KeptTensorsCollection)
    good = _answer(plan, "n-a", 1, 10).update
    kind = UpdateKind.KEPT_TENSORS.value
    assert answer_problem(kind, good) is None
    var = next(n for n in good if n.endswith("running_var"))
    assert "negative variances" in str(answer_problem(kind, {**good, var: -good[var]}))
    weight = next(n for n in good if n.endswith("norm.weight"))
    assert "NaN or Inf" in str(answer_problem(kind, {**good, weight: np.full_like(good[weight], np.nan)}))
    # A negative affine weight is a real value a trained norm can hold.
    assert answer_problem(kind, {**good, weight: -good[weight]}) is None


def test_which_strategies_leave_tensors_at_the_nodes() -> None:
    assert kept_at_nodes("fedbn", {}) == "norm_tensors"
    assert kept_at_nodes("pfednet", {"local": "norm_buffers"}) == "norm_buffers"
    assert kept_at_nodes("pfednet", {}) is None
    assert kept_at_nodes("fedavg", {"local": "norm_buffers"}) is None


def test_pfednet_takes_the_tensors_it_leaves_at_the_nodes_by_name() -> None:
    start = _start()
    strategy = make_strategy("pfednet", personal="head_norm", local="norm_buffers", edges=[("n-a", "n-b")])
    assert isinstance(strategy, PFedNet)
    strategy.initialize(start, ["n-a", "n-b"])
    (task, _) = strategy.configure_round(1, ["n-a", "n-b"])
    sent = set(task.params)
    assert sent and not any(is_norm_buffer(n) for n in sent)
    assert any(n.endswith("norm.weight") for n in sent)  # the affines are personal, and travel
    with pytest.raises(StrategyConfigError, match="local='statistics'"):
        make_strategy("pfednet", local="statistics")
