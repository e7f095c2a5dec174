"""The node's torch learner (``fedclinic-learn``, run out of process through the file contract) computes the
very update the simulation computes for the same data and seed, round after round, FedHelp's large client
(private large model + proxy, dual KD) and FedAvg alike."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_node.learning.external import ExternalLearner
from edge_node.learning.training_set import TrainingSet
from edge_node.protocol.tensors import encode_tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task, TaskState, TensorShape
from edge_node.uplink.tasks import TaskError
from hub.data.medmnist import load_medmnist
from hub.fl.averaging import DeltaAveraging
from hub.fl.fedbn import is_norm_tensor
from hub.fl.registry import make_strategy
from hub.fl.strategy import ClientResult, ClientTask, Params, Strategy
from hub.models.registry import create_model
from hub.training.learners import to_params
from hub.training.node_learner import (
    CLIENT_ID,
    LearnerInputError,
    NodeLearner,
    NodeTask,
    PublicSet,
    build_learner,
    clinic_data,
)
from hub.training.simulation import run_federation

LEARN = [sys.executable, "-m", "hub.training.node_learner"]
SEED = 7


class Recording:
    """A simulated clinic whose answers the test keeps (the simulation's side of the comparison)."""

    def __init__(self, inner: NodeLearner) -> None:
        self.inner = inner
        self.client_id = CLIENT_ID
        self.results: list[ClientResult] = []
        self.tasks: list[ClientTask] = []

    def fit(self, task: ClientTask) -> ClientResult:
        self.tasks.append(task)
        result = self.inner.fit(task)
        self.results.append(result)
        return result

    def state(self) -> Params:
        return self.inner.state()

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.restore(state)


@pytest.fixture(scope="module")
def hospital() -> TrainingSet:
    """96 real chest X-rays, preprocessed as the bundle says for inference: (x / 255 − 0.5) / 0.25."""
    images = load_medmnist("pneumoniamnist", "train")
    x01 = images.images[:96].astype(np.float32)[:, None] / 255.0  # (N, 1, 28, 28)
    x = ((x01 - 0.5) / 0.25).astype(np.float32)
    y = images.labels[:96].astype(np.int64).reshape(-1)
    return TrainingSet(x=x, y=y, sop_instance_uids=tuple(f"1.2.826.0.1.{i}" for i in range(96)))


def _wire_task(task: ClientTask, strategy: str) -> Task:
    return Task(
        task_id=f"t{task.round}",
        round_id=f"r{task.round}",
        round=task.round,
        kind=task.kind,
        strategy=strategy,
        config={k: v for k, v in task.config.items() if isinstance(v, (bool, int, float, str))},
        deadline=datetime.now(timezone.utc) + timedelta(hours=1),
        state=TaskState.OPEN,
        params_sha256=hashlib.sha256(b"").hexdigest(),
        params_bytes=0,
        expected=[
            TensorShape(name=n, shape=list(a.shape), dtype=str(a.dtype)) for n, a in task.params.items()
        ],
        max_update_bytes=1 << 30,
    )


def _compare(
    strategy: Strategy,
    strategy_name: str,
    start: Params,
    data: TrainingSet,
    work: Path,
    rounds: int,
    public: Params | None = None,
) -> Recording:
    """Run the simulation for ``rounds`` and, beside it, the node's learner process on the same tasks; the
    simulated clinic comes back.

    ``public`` (x, soft_labels) is what the simulated clinic holds, and what the hub ships to the node
    once, with round 1's params.
    """
    assert isinstance(strategy, DeltaAveraging)
    config = strategy.task_config(CLIENT_ID)
    held = PublicSet.from_arrays(public) if public else None
    recording = Recording(
        build_learner(config, clinic_data(data.x, data.y), SEED, held, strategy=strategy_name)
    )
    strategy.initialize(start, [CLIENT_ID])
    run_federation(strategy, {CLIENT_ID: recording}, rounds)
    node = ExternalLearner(LEARN, work, timeout_s=600)
    for task, sim in zip(recording.tasks, recording.results, strict=True):
        shipped = dict(task.params)
        if public and task.round == 1:
            shipped.update({f"public/{k}": v for k, v in public.items()})
        answer = node.answer(_wire_task(task, strategy_name), shipped, data)
        assert sorted(answer.tensors) == sorted(sim.update)
        assert any(np.abs(a).max() > 0 for a in sim.update.values())  # the clinic did learn something
        for name, arr in sim.update.items():
            np.testing.assert_array_equal(answer.tensors[name], arr, err_msg=f"round {task.round}: {name}")
        assert answer.num_examples == sim.num_examples == len(data)
        assert answer.metrics["train_loss"] == pytest.approx(sim.metrics["train_loss"], abs=0)
    return recording


def test_fedhelp_large_client_matches_the_simulation(hospital: TrainingSet, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    strategy = make_strategy(
        "fedhelp",
        large_clients=[CLIENT_ID],
        client_config={"model": "fedhelp_small", "batch_size": 32, "augment": True, "seed": SEED},
    )
    torch.manual_seed(0)
    start = to_params(create_model("fedhelp_small"))
    _compare(strategy, "fedhelp", start, hospital, tmp_path / "work", rounds=2)
    # The large model stayed at the node, in private/, and is not part of what it sent.
    private = tmp_path / "work" / "private" / "state.npz"
    assert private.is_file()
    with np.load(private, allow_pickle=False) as state:
        assert any(k.startswith("large.") for k in state.files)


def test_fedhelp_small_client_matches_the_simulation(hospital: TrainingSet, tmp_path: Path) -> None:
    """The public set ships once (round 1); round 2 trains toward the soft labels the node kept."""
    torch.set_num_threads(1)
    val = load_medmnist("pneumoniamnist", "val")
    x = ((val.images[:64, None].astype(np.float32) / 255.0 - 0.5) / 0.25).astype(np.float32)
    y = val.labels[:64].astype(np.int64).reshape(-1)
    # Smoothed labels stand in for the foundation model's soft outputs: any class probabilities will do here.
    soft = np.where(np.eye(2, dtype=np.float32)[y] > 0, 0.9, 0.1).astype(np.float32)
    strategy = make_strategy(
        "fedhelp", client_config={"model": "fedhelp_small", "batch_size": 32, "augment": True, "seed": SEED}
    )
    torch.manual_seed(0)
    start = to_params(create_model("fedhelp_small"))
    uids = hospital.sop_instance_uids[:48]
    small = TrainingSet(x=hospital.x[:48], y=hospital.y[:48], sop_instance_uids=uids)
    _compare(strategy, "fedhelp", start, small, tmp_path / "work", 2, {"x": x, "soft_labels": soft})
    assert (tmp_path / "work" / "public.npz").is_file()


def test_hsl_client_matches_the_simulation(hospital: TrainingSet, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    val = load_medmnist("pneumoniamnist", "val")
    x = ((val.images[:64, None].astype(np.float32) / 255.0 - 0.5) / 0.25).astype(np.float32)
    y = val.labels[:64].astype(np.float32).reshape(-1)
    strategy = make_strategy(
        "hsl", client_config={"model": "hsl_mmoe", "batch_size": 32, "augment": True, "seed": SEED}
    )
    torch.manual_seed(0)
    start = to_params(create_model("hsl_mmoe"))
    uids = hospital.sop_instance_uids[:48]
    small = TrainingSet(x=hospital.x[:48], y=hospital.y[:48], sop_instance_uids=uids)
    _compare(strategy, "hsl", start, small, tmp_path / "work", 1, {"x": x, "y": y})


def test_fedavg_client_matches_the_simulation(hospital: TrainingSet, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    strategy = make_strategy(
        "fedavg", client_config={"model": "fl_cnn", "model.norm": "group", "epochs": 1, "seed": SEED}
    )
    torch.manual_seed(0)
    start = to_params(create_model("fl_cnn", norm="group"))
    _compare(strategy, "fedavg", start, hospital, tmp_path / "work", rounds=1)


def test_fedbn_client_keeps_its_norms_and_sends_them_when_a_kept_tensors_round_asks(
    hospital: TrainingSet, tmp_path: Path
) -> None:
    """FedBN's normalisation tensors never travel with an update; the learner keeps its own in private/ and
    sends them, as its last round left them, when the hub collects them to deploy the model."""
    torch.set_num_threads(1)
    strategy = make_strategy(
        "fedbn", client_config={"model.norm": "batch", "batch_size": 32, "augment": True, "seed": SEED}
    )
    torch.manual_seed(0)
    start = to_params(create_model("fl_cnn", norm="batch"))
    kept = {n: a for n, a in start.items() if is_norm_tensor(n)}
    ask = ClientTask(CLIENT_ID, 3, UpdateKind.KEPT_TENSORS, kept, {"kept": "norm_tensors"})
    node = ExternalLearner(LEARN, tmp_path / "work", timeout_s=600)
    with pytest.raises(TaskError, match="trained no round yet"):
        node.answer(_wire_task(ask, "kept_tensors"), {}, hospital)
    recording = _compare(strategy, "fedbn", start, hospital, tmp_path / "work", rounds=2)
    assert not any(is_norm_tensor(n) for n in recording.results[-1].update)
    answer = node.answer(_wire_task(ask, "kept_tensors"), {}, hospital)
    own = to_params(recording.inner.model)  # type: ignore[attr-defined]
    assert sorted(answer.tensors) == sorted(kept) and answer.num_examples == len(hospital)
    assert answer.metrics == {"trained_round": 2.0}  # the round that left them
    for name in kept:
        np.testing.assert_array_equal(answer.tensors[name], own[name], err_msg=name)
    var = next(n for n in kept if n.endswith("running_var"))
    assert not np.array_equal(answer.tensors[var], start[var])  # the node's images moved them
    other = ClientTask(CLIENT_ID, 3, UpdateKind.KEPT_TENSORS, {"other.running_var": start[var]}, {})
    with pytest.raises(TaskError, match="keeps no tensors"):
        node.answer(_wire_task(other, "kept_tensors"), {}, hospital)


def test_a_task_the_learner_cannot_take_is_refused_with_the_reason(
    hospital: TrainingSet, tmp_path: Path
) -> None:
    strategy = make_strategy("fedhelp", client_config={"model": "fedhelp_small"})
    torch.manual_seed(0)
    start = to_params(create_model("fedhelp_small"))
    strategy.initialize(start, [CLIENT_ID])
    (task,) = strategy.configure_round(1, [CLIENT_ID])  # a small client: needs the public set
    with pytest.raises(TaskError, match="public set"):
        ExternalLearner(LEARN, tmp_path / "w").answer(_wire_task(task, "fedhelp"), task.params, hospital)
    unknown = _wire_task(task, "fedhelp").model_copy(update={"config": {**task.config, "model": "nope"}})
    with pytest.raises(TaskError, match="unknown model 'nope'"):
        ExternalLearner(LEARN, tmp_path / "w").answer(unknown, task.params, hospital)
    labels3 = TrainingSet(x=hospital.x[:4], y=np.array([0, 1, 2, 1]), sop_instance_uids=("a", "b", "c", "d"))
    with pytest.raises(TaskError, match="labels must be 0 or 1"):
        ExternalLearner(LEARN, tmp_path / "w").answer(_wire_task(task, "fedhelp"), task.params, labels3)


def test_the_learner_reads_the_images_with_the_normalisation_the_node_names(
    hospital: TrainingSet, tmp_path: Path
) -> None:
    """A node whose bundle normalises otherwise than the learners (here the test bundle's dataset statistics)
    hands its inputs over with that normalisation: the learner sees the same [0, 1] images either way."""
    x01 = hospital.x * 0.25 + 0.5
    other = TrainingSet(
        x=((x01 - 0.5719) / 0.1684).astype(np.float32),
        y=hospital.y,
        sop_instance_uids=hospital.sop_instance_uids,
        mean=(0.5719,),
        std=(0.1684,),
    )
    task = _wire_task(ClientTask(CLIENT_ID, 1, UpdateKind.WEIGHTS_DELTA, {}, {}), "fedavg")
    ExternalLearner(LEARN, tmp_path / "a")._prepare(task, {}, other)
    read = NodeTask.read(tmp_path / "a")
    np.testing.assert_allclose(read.data.train_x.numpy(), x01, atol=1e-5)
    # Without it, the learner would take the inputs for its own normalisation's: other grey values.
    unnamed = TrainingSet(other.x, other.y, other.sop_instance_uids)
    ExternalLearner(LEARN, tmp_path / "b")._prepare(task, {}, unnamed)
    assert np.abs(NodeTask.read(tmp_path / "b").data.train_x.numpy() - x01).max() > 0.05
    bad = tmp_path / "a" / "train.npz"
    bad.write_bytes(
        encode_tensors({"x": other.x, "y": other.y, "mean": np.array([0.5]), "std": np.array([0.0])})
    )
    with pytest.raises(LearnerInputError, match="std > 0"):
        NodeTask.read(tmp_path / "a")
