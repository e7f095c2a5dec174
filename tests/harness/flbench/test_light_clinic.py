"""A real node's head_delta update equals the simulation's for the same clinic data and seed, round after
round: ``bench fl``'s light clinics and ``edge_node.learning.dispatch`` run the same light learner code.

The node side is the real path: an installed, signed bundle (ONNX Runtime), labeled DICOM studies read and
preprocessed as for inference, the personal head kept in the node's file between rounds. The simulation
side is ``run_federation`` with ``head_avg`` and a ``LightClinic`` fed the same bundle's outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edge_node.inference.backend import CPU
from edge_node.inference.loaded_model import LoadedModel
from edge_node.inference.model_slot import ModelSlot
from edge_node.inference.personal_head import PersonalHeadStore
from edge_node.learning.dispatch import Learners, answer
from edge_node.learning.examples import training_set_from
from edge_node.learning.training_set import LabeledInstance
from edge_node.protocol.wire import Task, TaskState, TensorShape
from edge_node.state.database import Database
from edge_node.state.model_registry import ModelRegistry
from edge_node.uplink.tasks import LocalStats
from harness.flbench.light_clinic import LightClinic
from hub.fl.registry import make_strategy
from hub.fl.strategy import ClientResult, ClientTask, Params
from hub.training.simulation import RoundCheckpoint, run_federation
from tests.edge_node.conftest import require_test_bundle
from tests.support.labeled_studies import labeled_pneumonia

CLINIC = "clinic-1"
ROUNDS = 3


class Recording:
    """The simulated clinic, with the tasks it got and the results it gave kept for the comparison."""

    def __init__(self, inner: LightClinic) -> None:
        self.inner = inner
        self.client_id = inner.client_id
        self.tasks: list[ClientTask] = []
        self.results: list[ClientResult] = []
        self.personal: list[tuple[np.ndarray, np.ndarray]] = []

    def fit(self, task: ClientTask) -> ClientResult:
        self.tasks.append(task)
        self.results.append(self.inner.fit(task))
        assert self.inner.personal is not None
        self.personal.append((self.inner.personal.weight.copy(), self.inner.personal.bias.copy()))
        return self.results[-1]

    def state(self) -> Params:
        return self.inner.state()

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.restore(state)


@pytest.fixture()
def model(tmp_path: Path) -> Iterator[LoadedModel]:
    found = require_test_bundle()
    db = Database(tmp_path / "edge.sqlite3")
    slot = ModelSlot(
        ModelRegistry(db),
        tmp_path / "models",
        found.public_key,
        providers=[CPU],
        threads=1,
        personal_heads=PersonalHeadStore(tmp_path / "learning"),
    )
    slot.install(found.bundle)
    loaded = slot.current()
    assert loaded is not None and loaded.head is not None
    yield loaded
    db.close()


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> list[LabeledInstance]:
    """48 real PneumoniaMNIST images as DICOM studies (18 normal, 30 pneumonia), labeled by ground truth."""
    return labeled_pneumonia(tmp_path_factory.mktemp("spool"), shared_data, normal=18, pneumonia=30)


def _wire_task(task: ClientTask) -> Task:
    """The task as the hub would send it to the node (config and expected tensors from the strategy's)."""
    return Task(
        task_id=f"t{task.round}",
        round_id=f"r{task.round}",
        round=task.round,
        kind=task.kind,
        strategy="head_avg",
        config={k: v for k, v in task.config.items() if isinstance(v, (bool, int, float, str))},
        deadline=datetime.now(timezone.utc) + timedelta(hours=1),
        state=TaskState.OPEN,
        params_sha256="0" * 64,
        params_bytes=0,
        expected=[
            TensorShape(name=n, shape=list(a.shape), dtype=str(a.dtype)) for n, a in task.params.items()
        ],
        max_update_bytes=1 << 20,
    )


def test_a_node_and_the_simulation_send_the_same_head_delta(
    model: LoadedModel, labeled: list[LabeledInstance], tmp_path: Path
) -> None:
    head = model.head
    assert head is not None
    rng = np.random.default_rng(3)
    start = {
        head.weight.name: (rng.normal(size=head.weight.shape) * 0.1).astype(np.float32),
        head.bias.name: np.zeros(head.bias.shape, np.float32),
    }
    strategy = make_strategy(
        "head_avg", head=f"{head.weight.name},{head.bias.name}", client_config={"seed": 11, "epochs": 30}
    )
    strategy.initialize(start, [CLINIC])
    # The simulated clinic gets what the node's learner computes from the same studies: preprocessed as for
    # inference, then one pass of the bundle's backbone.
    data = training_set_from(labeled, model.preprocessing, model.task, model_id=model.model_id).training_set
    logits, embeddings = model.logits_and_embedding(data.x)
    sim = Recording(LightClinic(CLINIC, head, model.task, logits, embeddings, data.y))
    run_federation(strategy, {CLINIC: sim}, ROUNDS)
    assert len(sim.results) == ROUNDS

    store = PersonalHeadStore(tmp_path / "node-learning")
    learners = Learners(labeled=lambda: labeled, personal_heads=store)
    stats = LocalStats(label_counts={}, num_examples=0)
    for task, result, (p_weight, p_bias) in zip(sim.tasks, sim.results, sim.personal, strict=True):
        got = answer(_wire_task(task), dict(task.params), model, stats, learners)
        assert sorted(got.tensors) == sorted(result.update) == [head.bias.name, head.weight.name]
        assert all(np.abs(a).max() > 0 for a in result.update.values())  # the clinic did learn something
        for name, arr in result.update.items():
            assert got.tensors[name].dtype == arr.dtype == np.float32
            np.testing.assert_array_equal(got.tensors[name], arr, err_msg=f"round {task.round}: {name}")
        assert got.num_examples == result.num_examples == len(labeled)
        assert got.metrics == dict(result.metrics)
        # The personal head the node keeps (and serves with) is the simulated clinic's, to the bit.
        saved = store.load()
        assert saved is not None and saved.trained_round == task.round
        np.testing.assert_array_equal(saved.weight, p_weight)
        np.testing.assert_array_equal(saved.bias, p_bias)
    # Later rounds started from the averaged head, so the comparison covered the hub's side too.
    first, last = sim.tasks[0].params[head.weight.name], sim.tasks[-1].params[head.weight.name]
    assert np.abs(last - first).max() > 0


def test_a_light_federation_resumes_from_its_round_checkpoint(
    model: LoadedModel, labeled: list[LabeledInstance], tmp_path: Path
) -> None:
    """``bench fl --resume``: the personal heads come back from the checkpoint; round 3 is as if unbroken."""
    head = model.head
    assert head is not None
    data = training_set_from(labeled, model.preprocessing, model.task, model_id=model.model_id).training_set
    logits, embeddings = model.logits_and_embedding(data.x)
    halves = {"c1": slice(0, None, 2), "c2": slice(1, None, 2)}
    start = {
        head.weight.name: np.zeros(head.weight.shape, np.float32),
        head.bias.name: np.zeros(head.bias.shape, np.float32),
    }

    def federation(rounds: int, checkpoint: RoundCheckpoint | None) -> tuple[Params, dict[str, LightClinic]]:
        clinics = {
            c: LightClinic(c, head, model.task, logits[s], embeddings[s], data.y[s])
            for c, s in halves.items()
        }
        strategy = make_strategy(
            "head_avg", head=f"{head.weight.name},{head.bias.name}", client_config={"epochs": 10}
        )
        strategy.initialize(start, list(clinics))
        run_federation(strategy, clinics, rounds, checkpoint=checkpoint)
        return strategy.global_params, clinics

    unbroken, clinics = federation(3, None)
    checkpoint = RoundCheckpoint(tmp_path / "ckpt.npz")
    federation(2, checkpoint)
    resumed, again = federation(3, checkpoint)
    for name, arr in unbroken.items():
        np.testing.assert_array_equal(resumed[name], arr)
    for c in halves:
        first, second = clinics[c].personal, again[c].personal
        assert first is not None and second is not None
        np.testing.assert_array_equal(first.weight, second.weight)
