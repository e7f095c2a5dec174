"""The node's answers to the envelope rounds, on the real test bundle: the sums of the features it kept,
and a refusal that says why for every case the node cannot answer."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from edge_node.inference.loaded_model import LoadedModel, load_model
from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.envelope_rounds import (
    EMBEDDING,
    INTENSITY,
    EnvelopeRounds,
    held_out_params,
    node_moments,
)
from edge_node.protocol.signing import load_public_keys
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task, TaskState, TensorShape
from edge_node.state.envelope_features import EnvelopeFeatures
from edge_node.uplink.envelope_answer import EnvelopeRefused, answer_envelope
from edge_node.uplink.tasks import TaskError
from tests.edge_node.conftest import TrustedBundle


@pytest.fixture(scope="module")
def model(test_bundle: TrustedBundle) -> LoadedModel:
    verified = verify_bundle(test_bundle.bundle, load_public_keys(test_bundle.public_key))
    return load_model(verified, ["CPUExecutionProvider"], 1)


def _rounds(model: LoadedModel, **change: object) -> EnvelopeRounds:
    assert model.head is not None and model.intensity is not None
    fields: dict[str, object] = {
        "model_id": model.model_id,
        "model_version": model.model_version,
        "embedding_dim": model.head.embedding_dim,
        "levels": tuple(model.intensity.levels),
        "folds": 3,
    }
    return EnvelopeRounds(**{**fields, **change})  # type: ignore[arg-type]


def _task(kind: UpdateKind, rounds: EnvelopeRounds, shapes: dict[str, tuple[int, ...]], dtype: str) -> Task:
    return Task(
        task_id="t-1",
        round_id="r-1",
        round=1,
        kind=kind,
        strategy=kind.value,
        config=dict(rounds.to_config()),
        deadline=datetime.now(timezone.utc) + timedelta(minutes=5),
        state=TaskState.OPEN,
        params_sha256="0" * 64,
        params_bytes=0,
        expected=[TensorShape(name=n, shape=list(s), dtype=dtype) for n, s in shapes.items()],
        max_update_bytes=1 << 24,
    )


def _kept(model: LoadedModel, n: int) -> EnvelopeFeatures:
    rng = np.random.default_rng(n)
    assert model.head is not None and model.intensity is not None
    grey = np.sort(rng.uniform(size=(n, len(model.intensity.levels))), axis=1)
    return EnvelopeFeatures(
        keys=tuple(f"2.25.{i}" for i in range(n)),
        embedding=rng.normal(size=(n, model.head.embedding_dim)),
        intensity=grey,
    )


def test_both_answers_are_the_rounds_arithmetic_over_the_kept_features(model: LoadedModel) -> None:
    rounds = _rounds(model)
    kept = _kept(model, 45)
    asked: list[tuple[str, str]] = []

    def read(model_id: str, version: str) -> EnvelopeFeatures:
        asked.append((model_id, version))
        return kept

    assert kept.intensity is not None
    features = {EMBEDDING: kept.embedding, INTENSITY: kept.intensity}
    first = answer_envelope(
        _task(UpdateKind.ENVELOPE_MOMENTS, rounds, rounds.moment_shapes(), "f8"), {}, model, read
    )
    assert asked == [(model.model_id, model.model_version)] and first.num_examples == 45
    want = node_moments(features, list(kept.keys), rounds)
    assert set(first.tensors) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(first.tensors[name], value)
    params = held_out_params(first.tensors, rounds)
    second = answer_envelope(
        _task(UpdateKind.ENVELOPE_DISTANCES, rounds, rounds.histogram_shapes(), "i8"), params, model, read
    )
    assert all(int(h.sum()) == 45 for h in second.tensors.values())


@pytest.mark.parametrize(
    ("change", "n", "reason"),
    [
        ({"model_version": "9.9.9"}, 45, "this node serves"),
        ({"levels": (0.1, 0.5, 0.9)}, 45, "levels are not the bundle's"),
        ({}, 9, "analysed 9 images"),
    ],
)
def test_a_node_refuses_saying_why(
    model: LoadedModel, change: dict[str, object], n: int, reason: str
) -> None:
    rounds = _rounds(model, **change)
    task = _task(UpdateKind.ENVELOPE_MOMENTS, rounds, rounds.moment_shapes(), "f8")
    with pytest.raises(EnvelopeRefused, match=reason):
        answer_envelope(task, {}, model, lambda _m, _v: _kept(model, n))
    with pytest.raises(EnvelopeRefused, match="no model is installed"):
        answer_envelope(task, {}, None, lambda _m, _v: _kept(model, n))


def test_held_out_envelopes_of_another_shape_are_not_answered(model: LoadedModel) -> None:
    rounds = _rounds(model)
    task = _task(UpdateKind.ENVELOPE_DISTANCES, rounds, rounds.histogram_shapes(), "i8")
    with pytest.raises(TaskError, match="do not fit this bundle"):
        answer_envelope(task, {"embedding/mean": np.zeros((2, 2))}, model, lambda _m, _v: _kept(model, 30))
