"""The light learner on numbers: it learns, it is deterministic, it refuses what does not fit."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.learning.errors import LearningError
from edge_node.learning.light import HeadPair, LightConfig, LightLearner
from edge_node.protocol.manifest import ClassLabel, HeadSpec, HeadTensor, TaskSpec

D = 8
HEAD = HeadSpec(
    embedding_output="embedding",
    prediction_output="logits",
    weight=HeadTensor(name="head.fc.weight", shape=[1, D]),
    bias=HeadTensor(name="head.fc.bias", shape=[1]),
)
BINARY = TaskSpec(
    kind="binary",
    classes=[ClassLabel(index=0, name="normal"), ClassLabel(index=1, name="pneumonia")],
    output_activation="sigmoid",
)


def _data(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes whose embeddings differ along a direction the starting head does not use."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    e = rng.normal(size=(n, D))
    e[:, 3] += 2.0 * y - 1.0  # (N, D): class signal in dimension 3
    return e.astype(np.float32), y


def _start() -> HeadPair:
    w = np.zeros((1, D))
    w[0, 0] = 0.5  # the shared head looks at a dimension without signal
    return HeadPair(w, np.zeros(1))


def test_training_lowers_the_loss_and_only_the_shared_delta_is_returned() -> None:
    e, y = _data()
    learner = LightLearner(HEAD, BINARY)
    result = learner.train(e, y, _start())
    assert result.loss_after < 0.6 * result.loss_before
    assert set(result.shared_delta) == {"head.fc.weight", "head.fc.bias"}
    assert result.shared_delta["head.fc.weight"].shape == (1, D)
    assert result.shared_delta["head.fc.weight"].dtype == np.float32
    # Both heads moved toward the signal, and the personal one is not part of the update.
    assert result.shared_delta["head.fc.weight"][0, 3] > 0 and result.personal.weight[0, 3] > 0
    assert result.num_examples == len(y)
    # A stronger proximal weight holds the shared head nearer the one that was sent.
    held = LightLearner(HEAD, BINARY, LightConfig(mu=1.0)).train(e, y, _start())
    assert (
        np.abs(held.shared_delta["head.fc.weight"]).sum()
        < np.abs(result.shared_delta["head.fc.weight"]).sum()
    )
    # The personal head is trained on top of the served logits: what it learned is what the node serves.
    served = e.astype(np.float64) @ _start().weight.T + _start().bias  # (N, 1)
    assert learner.loss(e, y, served, result.personal) == pytest.approx(result.loss_after)


def test_same_seed_same_update_other_seed_other_update() -> None:
    e, y = _data()
    a = LightLearner(HEAD, BINARY, LightConfig(seed=3)).train(e, y, _start())
    b = LightLearner(HEAD, BINARY, LightConfig(seed=3)).train(e, y, _start())
    c = LightLearner(HEAD, BINARY, LightConfig(seed=4)).train(e, y, _start())
    for name in a.shared_delta:
        assert np.array_equal(a.shared_delta[name], b.shared_delta[name])
    assert np.array_equal(a.personal.weight, b.personal.weight)
    assert not np.array_equal(a.shared_delta["head.fc.weight"], c.shared_delta["head.fc.weight"])


def test_a_warm_personal_head_carries_over() -> None:
    e, y = _data()
    learner = LightLearner(HEAD, BINARY, LightConfig(epochs=5))
    first = learner.train(e, y, _start())
    second = learner.train(e, y, _start(), first.personal)
    assert second.loss_before == pytest.approx(first.loss_after)  # starts where last round's head left off
    assert second.loss_after < first.loss_after


def test_shared_head_must_match_the_bundles_names_shapes_and_be_finite() -> None:
    learner = LightLearner(HEAD, BINARY)
    good = {"head.fc.weight": np.zeros((1, D), np.float32), "head.fc.bias": np.zeros(1, np.float32)}
    assert learner.shared_from(good).weight.shape == (1, D)
    with pytest.raises(LearningError, match=r"no 'head\.fc\.bias'"):
        learner.shared_from({"head.fc.weight": good["head.fc.weight"], "fc.bias": good["head.fc.bias"]})
    with pytest.raises(LearningError, match=r"needs float \[1, 8\]"):
        learner.shared_from({**good, "head.fc.weight": np.zeros((2, D), np.float32)})
    with pytest.raises(LearningError, match="needs float"):
        learner.shared_from({**good, "head.fc.weight": np.zeros((1, D), np.int64)})
    with pytest.raises(LearningError, match="not finite"):
        learner.shared_from({**good, "head.fc.bias": np.array([np.nan], np.float32)})
    e, y = _data()
    with pytest.raises(LearningError, match="do not fit"):
        learner.train(e[:, :4], y, _start())
    with pytest.raises(LearningError, match="personal head"):
        learner.train(e, y, _start(), HeadPair(np.zeros((1, 4)), np.zeros(1)))


def test_too_few_labels_is_a_reason_not_a_guess() -> None:
    e, y = _data(n=40)
    learner = LightLearner(HEAD, BINARY, LightConfig(min_examples=10, min_per_class=3))
    with pytest.raises(LearningError, match="only 6 labeled examples"):
        learner.train(e[:6], y[:6], _start())
    one_class = np.zeros(20, dtype=np.int64)
    one_class[:2] = 1
    with pytest.raises(LearningError, match=r"normal: 18, pneumonia: 2"):
        learner.train(e[:20], one_class, _start())


def test_softmax_heads_train_and_mismatched_tasks_are_refused() -> None:
    k = 3
    task = TaskSpec(
        kind="multiclass",
        classes=[ClassLabel(index=i, name=f"c{i}") for i in range(k)],
        output_activation="softmax",
    )
    head = HEAD.model_copy(
        update={
            "weight": HeadTensor(name="fc.weight", shape=[k, D]),
            "bias": HeadTensor(name="fc.bias", shape=[k]),
        }
    )
    rng = np.random.default_rng(0)
    y = np.arange(90) % k
    e = rng.normal(size=(90, D))
    e[np.arange(90), y] += 3.0  # class c lives in dimension c
    result = LightLearner(head, task).train(e, y, HeadPair.zeros(k, D))
    assert result.loss_after < 0.5 * result.loss_before
    with pytest.raises(LearningError, match="one sigmoid logit"):
        LightLearner(HEAD, task)


def test_task_config_overrides_and_bad_values() -> None:
    cfg = LightConfig.from_task({"epochs": 3, "mu": 0.5, "unrelated": "x"})
    assert (cfg.epochs, cfg.mu, cfg.lam) == (3, 0.5, LightConfig().lam)
    with pytest.raises(LearningError, match="epochs"):
        LightConfig.from_task({"epochs": 2.5})
    with pytest.raises(LearningError, match="mu"):
        LightConfig.from_task({"mu": -1.0})
    with pytest.raises(LearningError, match="at least 1"):
        LightConfig.from_task({"batch_size": 0})
