"""Task answers without torch: ``public_logits`` is a real ONNX Runtime forward, ``stats`` counts classes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from edge_node.inference.loaded_model import LoadedModel, load_model
from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.signing import load_public_keys
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task, TaskState, TensorShape
from edge_node.uplink.tasks import LocalStats, TaskError, answer_task
from tests.edge_node.conftest import TrustedBundle


@pytest.fixture(scope="module")
def model(test_bundle: TrustedBundle) -> LoadedModel:
    verified = verify_bundle(test_bundle.bundle, load_public_keys(test_bundle.public_key))
    return load_model(verified, ["CPUExecutionProvider"], 1)


def _task(kind: UpdateKind, expected: list[TensorShape]) -> Task:
    return Task(
        task_id="t-1",
        round_id="r-1",
        round=1,
        kind=kind,
        strategy="fedhelp",
        config={},
        deadline=datetime.now(timezone.utc) + timedelta(minutes=5),
        state=TaskState.OPEN,
        params_sha256="0" * 64,
        params_bytes=0,
        expected=expected,
        max_update_bytes=1 << 20,
    )


def test_public_logits_are_the_models_raw_outputs(model: LoadedModel) -> None:
    shape = [d if d > 0 else 5 for d in model.input_shape]  # (N, C, H, W)
    anchors = np.random.default_rng(0).random(shape, dtype=np.float32)
    k = len(model.task.classes)
    outputs = model.manifest.io.outputs[0].shape[-1]
    task = _task(
        UpdateKind.PUBLIC_LOGITS, [TensorShape(name="logits", shape=[shape[0], outputs], dtype="float32")]
    )
    answer = answer_task(task, {"anchors": anchors}, model, LocalStats({}, 0))
    logits = answer.tensors["logits"]
    assert logits.shape == (shape[0], outputs) and logits.dtype == np.float32
    assert answer.num_examples == shape[0]
    # The same images through the node's own scoring path give the probabilities these logits imply.
    probs = model.probabilities(anchors)
    assert probs.shape == (shape[0], k)
    if model.task.output_activation == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), probs, atol=1e-5)
    else:  # one logit per image: the positive class's probability is its sigmoid
        positive = model.task.positive_class
        np.testing.assert_allclose(1 / (1 + np.exp(-logits[:, -1])), probs[:, positive], atol=1e-5)
    assert len({round(float(v), 6) for v in logits.ravel()}) > 1  # different images, different outputs


def test_one_sigmoid_logit_becomes_two_class_logits(model: LoadedModel) -> None:
    if model.task.output_activation != "sigmoid" or model.manifest.io.outputs[0].shape[-1] != 1:
        pytest.skip("the test bundle is not a one-logit sigmoid model")
    shape = [d if d > 0 else 4 for d in model.input_shape]
    anchors = np.random.default_rng(1).random(shape, dtype=np.float32)
    task = _task(UpdateKind.PUBLIC_LOGITS, [TensorShape(name="logits", shape=[shape[0], 2], dtype="float32")])
    logits = answer_task(task, {"inputs": anchors}, model, LocalStats({}, 0)).tensors["logits"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), model.probabilities(anchors), atol=1e-5)


def test_public_logits_refuse_what_they_cannot_answer(model: LoadedModel) -> None:
    task = _task(UpdateKind.PUBLIC_LOGITS, [TensorShape(name="logits", shape=[3, 7], dtype="float32")])
    shape = [d if d > 0 else 3 for d in model.input_shape]
    anchors = np.zeros(shape, dtype=np.float32)
    with pytest.raises(TaskError, match="shape"):
        answer_task(task, {"anchors": anchors}, model, LocalStats({}, 0))
    with pytest.raises(TaskError, match="no anchor images"):
        answer_task(task, {"weights": anchors}, model, LocalStats({}, 0))
    with pytest.raises(TaskError, match="none is installed"):
        answer_task(task, {"anchors": anchors}, None, LocalStats({}, 0))


def test_stats_count_classes_in_model_order(model: LoadedModel) -> None:
    names = [c.name for c in model.task.classes]
    counts = {names[-1]: 4, names[0]: 2}
    task = _task(UpdateKind.STATS, [TensorShape(name="label_counts", shape=[len(names)], dtype="int64")])
    answer = answer_task(task, {}, model, LocalStats(counts, 6))
    expected = np.zeros(len(names), dtype=np.int64)
    expected[0], expected[-1] = 2, 4
    np.testing.assert_array_equal(answer.tensors["label_counts"], expected)
    assert answer.tensors["label_counts"].dtype == np.int64
    with pytest.raises(TaskError, match="feature_mean"):
        answer_task(
            _task(UpdateKind.STATS, [TensorShape(name="feature_mean", shape=[16], dtype="float32")]),
            {},
            model,
            LocalStats(counts, 6),
        )
    with pytest.raises(TaskError, match="learner"):
        answer_task(_task(UpdateKind.WEIGHTS_DELTA, []), {}, model, LocalStats(counts, 6))
