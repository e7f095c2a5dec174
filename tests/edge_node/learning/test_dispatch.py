"""Answering head_delta tasks on a real installed bundle: the update, the personal head it leaves behind,
what the node then serves, and every reason to refuse instead of guessing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from edge_node.errors import ModelError
from edge_node.inference.backend import CPU
from edge_node.inference.loaded_model import LoadedModel
from edge_node.inference.model_slot import ModelSlot
from edge_node.inference.personal_head import PersonalHead, PersonalHeadStore
from edge_node.learning.dispatch import Learners, LearningRefused, answer
from edge_node.learning.examples import training_set_from
from edge_node.learning.training_set import LabeledInstance
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task, TaskState, TensorShape
from edge_node.settings import load_settings
from edge_node.state.database import Database
from edge_node.state.model_registry import ModelRegistry
from edge_node.state.node_state import NodeState
from edge_node.status_report import StatusReport
from edge_node.uplink.tasks import LocalStats, TaskError
from tests.edge_node.conftest import TrustedBundle, make_signed_bundle
from tests.support.labeled_studies import labeled_pneumonia


@pytest.fixture()
def slot(tmp_path: Path, test_bundle: TrustedBundle) -> Iterator[ModelSlot]:
    db = Database(tmp_path / "edge.sqlite3")
    made = ModelSlot(
        ModelRegistry(db),
        tmp_path / "models",
        test_bundle.public_key,
        providers=[CPU],
        threads=1,
        personal_heads=PersonalHeadStore(tmp_path / "learning"),
    )
    made.install(test_bundle.bundle)
    yield made
    db.close()


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> list[LabeledInstance]:
    """40 real PneumoniaMNIST images as DICOM studies, half of each class, labeled by their ground truth."""
    return labeled_pneumonia(tmp_path_factory.mktemp("spool"), shared_data, normal=20, pneumonia=20)


def _model(slot: ModelSlot) -> LoadedModel:
    model = slot.current()
    assert model is not None and model.head is not None
    return model


def _task(model: LoadedModel, kind: UpdateKind = UpdateKind.HEAD_DELTA, **config: float | int) -> Task:
    head = model.head
    assert head is not None
    return Task(
        task_id="t-1",
        round_id="r-1",
        round=3,
        kind=kind,
        strategy="head_avg",
        config=dict(config),
        deadline=datetime.now(timezone.utc) + timedelta(hours=1),
        state=TaskState.OPEN,
        params_sha256="0" * 64,
        params_bytes=0,
        expected=[
            TensorShape(name=head.weight.name, shape=head.weight.shape, dtype="float32"),
            TensorShape(name=head.bias.name, shape=head.bias.shape, dtype="float32"),
        ],
        max_update_bytes=1 << 20,
    )


def _shared(model: LoadedModel) -> dict[str, np.ndarray]:
    head = model.head
    assert head is not None
    rng = np.random.default_rng(0)
    return {
        head.weight.name: (rng.normal(size=head.weight.shape) * 0.1).astype(np.float32),
        head.bias.name: np.zeros(head.bias.shape, np.float32),
    }


NO_STATS = LocalStats(label_counts={}, num_examples=0)


def test_head_delta_sends_the_shared_delta_and_the_node_serves_its_personal_head(
    slot: ModelSlot, labeled: list[LabeledInstance], tmp_path: Path
) -> None:
    model = _model(slot)
    store = PersonalHeadStore(tmp_path / "learning")
    x = training_set_from(labeled, model.preprocessing, model.task, model_id=model.model_id).training_set.x
    shared_scores = model.predict(x)
    learners = Learners(labeled=lambda: labeled, personal_heads=store)
    got = answer(_task(model), _shared(model), model, NO_STATS, learners)
    head = model.head
    assert head is not None
    assert {n: list(a.shape) for n, a in got.tensors.items()} == {
        head.weight.name: head.weight.shape,
        head.bias.name: head.bias.shape,
    }
    assert all(a.dtype == np.float32 and np.any(a != 0) for a in got.tensors.values())
    assert got.num_examples == 40
    assert got.metrics["loss_after"] < got.metrics["loss_before"]
    saved = store.load()
    assert saved is not None and saved.trained_round == 3 and saved.model_id == model.model_id
    # The slot picks the new head up at the next study: backbone + shared head + personal head.
    served = slot.current()
    assert served is model and served.personal is not None
    assert np.array_equal(served.personal.weight, saved.weight)
    personal_scores = served.predict(x)
    assert np.abs(personal_scores - shared_scores).max() > 1e-3
    # The personal head is not in the update, under any name or value.
    for sent in got.tensors.values():
        for secret in (saved.weight, saved.bias):
            assert sent.shape != secret.shape or not np.allclose(sent, secret, atol=1e-6)
    # Public logits come from the shared model alone: the personal head cannot leak through them either.
    anchors = x[:8]
    logits_task = _task(model, UpdateKind.PUBLIC_LOGITS).model_copy(
        update={"expected": [TensorShape(name="logits", shape=[8, 1], dtype="float32")]}
    )
    public = answer(logits_task, {"inputs": anchors}, served, NO_STATS, learners)
    own_logits, _ = served.logits_and_embedding(anchors)
    np.testing.assert_array_equal(public.tensors["logits"], own_logits.astype(np.float32))
    # The same task, labels and seed give the same update.
    again = answer(
        _task(model),
        _shared(model),
        model,
        NO_STATS,
        Learners(lambda: labeled, PersonalHeadStore(tmp_path / "other")),
    )
    for name, arr in got.tensors.items():
        assert np.array_equal(arr, again.tensors[name])


def test_too_few_labels_and_wrong_tasks_are_refused_with_the_reason(
    slot: ModelSlot, labeled: list[LabeledInstance], tmp_path: Path
) -> None:
    model = _model(slot)
    store = PersonalHeadStore(tmp_path / "learning")
    few = Learners(labeled=lambda: labeled[:4], personal_heads=store)
    with pytest.raises(LearningRefused, match="only 4 labeled examples"):
        answer(_task(model), _shared(model), model, NO_STATS, few)
    one_class = Learners(labeled=lambda: labeled[:20], personal_heads=store)  # all "normal"
    with pytest.raises(LearningRefused, match="normal: 20, pneumonia: 0"):
        answer(_task(model), _shared(model), model, NO_STATS, one_class)
    enough = Learners(labeled=lambda: labeled, personal_heads=store)
    with pytest.raises(LearningRefused, match="params hold no"):
        answer(_task(model), {}, model, NO_STATS, enough)
    with pytest.raises(LearningRefused, match="whole number"):
        answer(_task(model, epochs=1.5), _shared(model), model, NO_STATS, enough)
    with pytest.raises(LearningRefused, match="none is installed"):
        answer(_task(model), _shared(model), None, NO_STATS, enough)
    assert store.load() is None  # nothing was trained, nothing kept
    # weights_delta needs the torch learner: skipped (not refused) with the reason.
    with pytest.raises(TaskError, match="torch learner") as info:
        answer(_task(model, UpdateKind.WEIGHTS_DELTA), _shared(model), model, NO_STATS, enough)
    assert not isinstance(info.value, LearningRefused)


def test_bad_instances_are_skipped_with_a_reason(
    labeled: list[LabeledInstance], slot: ModelSlot, tmp_path: Path
) -> None:
    model = _model(slot)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    items = [
        *labeled[:3],
        LabeledInstance("1.2.3", "1.2", junk, "normal", "page"),
        LabeledInstance("1.2.4", "1.2", labeled[3].path, "maybe", "page"),
        LabeledInstance("1.2.5", "1.2", tmp_path / "gone.dcm", "normal", "page"),
        labeled[0],  # the same instance twice counts once
    ]
    examples = training_set_from(items, model.preprocessing, model.task, model_id=model.model_id)
    assert len(examples.training_set) == 3
    assert examples.training_set.x.shape == (3, 1, 28, 28)
    assert {s.sop_instance_uid: s.reason for s in examples.skipped} == {
        "1.2.3": "not a readable DICOM file",
        "1.2.4": "label 'maybe' is not a class of the model",
        "1.2.5": "the file is no longer in the spool",
    }


def test_a_bundle_without_embedding_serves_but_cannot_learn(
    tmp_path: Path, signing_key: tuple[Ed25519PrivateKey, Path], labeled: list[LabeledInstance]
) -> None:
    key, pub = signing_key
    db = Database(tmp_path / "edge.sqlite3")
    old = ModelSlot(ModelRegistry(db), tmp_path / "models", pub, providers=[CPU], threads=1)
    old.install(make_signed_bundle(tmp_path / "old", key))
    model = old.current()
    assert model is not None and model.head is None
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert model.predict(x).shape == (2,)
    with pytest.raises(ModelError, match="no embedding output"):
        model.embed(x)
    task = Task.model_validate({**_task_fields(), "expected": []})
    learners = Learners(labeled=lambda: labeled, personal_heads=PersonalHeadStore(tmp_path / "learning"))
    with pytest.raises(LearningRefused, match="no embedding output"):
        answer(task, {}, model, NO_STATS, learners)
    db.close()


def _task_fields() -> dict[str, object]:
    return {
        "task_id": "t-2",
        "round_id": "r-2",
        "round": 1,
        "kind": "head_delta",
        "strategy": "head_avg",
        "config": {},
        "deadline": datetime.now(timezone.utc) + timedelta(hours=1),
        "state": "open",
        "params_sha256": "0" * 64,
        "params_bytes": 0,
        "max_update_bytes": 1024,
    }


def test_a_head_that_does_not_fit_the_new_bundle_is_retired(slot: ModelSlot, tmp_path: Path) -> None:
    model = _model(slot)
    store = PersonalHeadStore(tmp_path / "learning")
    head = model.head
    assert head is not None
    k, d = head.weight.shape
    fits = PersonalHead(np.ones((k, d)), np.zeros(k), model.model_id, 2, "2026-01-01T00:00:00+00:00")
    store.save(fits)
    assert _model(slot).personal is not None
    store.save(PersonalHead(np.ones((k, d + 1)), np.zeros(k), model.model_id, 4, "2026-01-02T00:00:00+00:00"))
    assert _model(slot).personal is None
    note = store.retired()
    assert note is not None and "differs from the head" in str(note["reason"]) and note["trained_round"] == 4
    assert store.load() is None
    store.save(PersonalHead(np.ones((k, d)), np.zeros(k), "another-model", 5, "2026-01-03T00:00:00+00:00"))
    assert _model(slot).personal is None
    note = store.retired()
    assert note is not None and "trained for model another-model" in str(note["reason"])


def test_status_says_what_the_personal_head_is(slot: ModelSlot, tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    state = NodeState.open(settings.db_path)  # the slot's database: the same node
    model = _model(slot)
    head = model.head
    assert head is not None
    store = PersonalHeadStore(tmp_path / "learning")
    assert StatusReport.collect(settings, state, 5).personal_head is None
    store.save(PersonalHead(np.ones(head.weight.shape), np.zeros(head.bias.shape), model.model_id, 7, "t"))
    report = StatusReport.collect(settings, state, 5)
    assert report.personal_head == {
        "state": "serving",
        "trained_round": 7,
        "trained_at": "t",
        "model_id": model.model_id,
        "sent": False,
    }
    console = Console(record=True, width=200)
    report.print_text(console)
    assert "serves a personalised head (trained in round 7 at t, never sent)" in console.export_text()
    store.retire("a new bundle: it was trained for model x")
    report = StatusReport.collect(settings, state, 5)
    assert report.personal_head is not None and report.personal_head["state"] == "retired"
    console = Console(record=True, width=200)
    report.print_text(console)
    assert "retired (a new bundle: it was trained for model x)" in console.export_text()
    state.close()


def _sketch_task(model: LoadedModel, *expected: TensorShape, stats_of: str = "training_set") -> Task:
    return _task(model, UpdateKind.STATS).model_copy(
        update={"strategy": "pfednet", "config": {"stats_of": stats_of}, "expected": list(expected)}
    )


SKETCH = (
    TensorShape(name="label_counts", shape=[2], dtype="int64"),
    TensorShape(name="feature_mean", shape=[16], dtype="float32"),
)


def test_a_pfednet_stats_task_gets_the_sketch_of_the_training_set(
    slot: ModelSlot, labeled: list[LabeledInstance], tmp_path: Path
) -> None:
    """Label counts of the labeled set (not of the studies analysed) and its mean image in [0, 1], pooled:
    what the simulation's clinics send for the same images."""
    model = _model(slot)
    learners = Learners(labeled=lambda: labeled[10:], personal_heads=PersonalHeadStore(tmp_path / "learning"))
    analysed = LocalStats(label_counts={"normal": 500, "pneumonia": 3}, num_examples=503)
    got = answer(_sketch_task(model, *SKETCH), {}, model, analysed, learners)
    np.testing.assert_array_equal(got.tensors["label_counts"], [10, 20])
    assert got.tensors["label_counts"].dtype == np.int64 and got.num_examples == 30
    x = training_set_from(
        labeled[10:], model.preprocessing, model.task, model_id=model.model_id
    ).training_set.x
    mean, std = model.preprocessing.mean[0], model.preprocessing.std[0]
    x01 = x.astype(np.float64) * std + mean  # (N, 1, 28, 28)
    want = x01.mean(axis=0).reshape(4, 7, 4, 7).mean(axis=(1, 3)).reshape(-1)  # 7 × 7 blocks
    np.testing.assert_allclose(got.tensors["feature_mean"], want, rtol=1e-5)
    assert got.tensors["feature_mean"].min() > 0.0 and got.tensors["feature_mean"].max() < 1.0
    # The plain stats collection still counts what the node analysed.
    plain = answer(_sketch_task(model, SKETCH[0], stats_of=""), {}, model, analysed, learners)
    np.testing.assert_array_equal(plain.tensors["label_counts"], [500, 3])


def test_a_sketch_is_refused_over_too_few_images_or_without_a_training_set(
    slot: ModelSlot, labeled: list[LabeledInstance], tmp_path: Path
) -> None:
    model = _model(slot)
    store = PersonalHeadStore(tmp_path / "learning")
    with pytest.raises(LearningRefused, match="9 labeled examples; it sends a sketch over at least 10"):
        answer(_sketch_task(model, *SKETCH), {}, model, NO_STATS, Learners(lambda: labeled[:9], store))
    enough = Learners(lambda: labeled, store)
    with pytest.raises(LearningRefused, match="'feature_cov'"):
        cov = TensorShape(name="feature_cov", shape=[16, 16], dtype="float32")
        answer(_sketch_task(model, cov), {}, model, NO_STATS, enough)
    with pytest.raises(LearningRefused, match=r"would have shape \[16\], the task expects \[48\]"):
        rgb = TensorShape(name="feature_mean", shape=[48], dtype="float32")
        answer(_sketch_task(model, rgb), {}, model, NO_STATS, enough)
    with pytest.raises(LearningRefused, match="preprocessing; no model"):
        answer(_sketch_task(model, *SKETCH), {}, None, NO_STATS, enough)
    with pytest.raises(TaskError, match=r"no \[learning\] section"):
        answer(_sketch_task(model, *SKETCH), {}, model, NO_STATS, None)
