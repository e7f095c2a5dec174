"""A ``kept_tensors`` round through the hub's round controller (SQLite store): it opens without protection
only, refuses at intake an answer no model could hold and keeps the node's task open, publishes the
example-weighted mean with every node's copy, and ``models from-round --kept-from`` refuses what it
cannot use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_node.protocol.wire import RoundProtection, RoundStart, RoundState
from hub.fl.aggregate import coordinate_median, weighted_mean
from hub.models.registry import create_model
from hub.rounds.controller import RoundController
from hub.rounds.kept_plans import mean_part, node_part
from hub.service.errors import RoundConfigError, UpdateRejected
from hub.service.settings import HubSettings
from hub.store.artifacts import store_tensors
from hub.store.database import Database, open_database
from hub.store.schema import Round
from hub.training.learners import to_params
from tests.hub.service.test_rounds import answer, enroll
from tests.support.student_checkpoint import pneumonia_checkpoint

pytestmark = pytest.mark.hub

HUB = Path(sys.executable).parent / "fedclinic-hub"


def _start() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return to_params(create_model("fl_cnn", norm="batch"))


def _kept_round(
    db: Database,
    rc: RoundController,
    protection: RoundProtection | None = None,
    config: dict[str, str] | None = None,
) -> str:
    with db.session() as session:
        artifact = store_tensors(session, _start())
    request = RoundStart(
        strategy="kept_tensors",
        min_results=2,
        deadline_s=600,
        model_artifact=artifact,
        protection=protection,
        config=config or {},
    )
    return rc.start(request, actor="t").round_id


def test_a_kept_round_takes_no_protection(db: Database, rc: RoundController) -> None:
    enroll(db, 3)
    with pytest.raises(RoundConfigError, match="kept_tensors round collects each node's own tensors"):
        _kept_round(db, rc, RoundProtection(clip_norm=1.0))


def test_a_robust_kept_round_publishes_the_nodes_median(db: Database, rc: RoundController) -> None:
    nodes = enroll(db, 3)
    with pytest.raises(RoundConfigError, match="reduce by 'median'"):
        _kept_round(db, rc, config={"robust": "mean"})
    round_id = _kept_round(db, rc, config={"kept": "norm_buffers", "robust": "median"})
    rng = np.random.default_rng(1)
    sent = []
    for k, node in enumerate(nodes):
        (task,) = rc.open_tasks(node)
        assert task.config == {"kept": "norm_buffers"}  # the reduction is the hub's; the node is not told
        update = {
            e.name: (
                rng.uniform(0.1, 2.0, e.shape) if np.dtype(e.dtype).kind == "f" else np.full(e.shape, 7 + k)
            ).astype(e.dtype)
            for e in task.expected
        }
        if k == 2:  # a loud node: a thousand times the images, statistics a million times wider
            update = {n: a * 1e6 if n.endswith("running_var") else a for n, a in update.items()}
        assert answer(rc, task, node, update, n=30_000 if k == 2 else 30)
        sent.append(update)
    rc.close_round(round_id)
    assert rc.info(round_id).state is RoundState.PUBLISHED
    mean = mean_part(rc.result(round_id))
    for name, arr in coordinate_median(sent).items():
        np.testing.assert_array_equal(mean[name], arr, err_msg=name)
    var = next(n for n in mean if n.endswith("running_var"))
    assert np.all(mean[var] <= np.maximum(sent[0][var], sent[1][var]))


def test_the_round_publishes_the_mean_and_each_node_s_copy(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub-data"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [str(HUB), "init", "--public-url", "https://127.0.0.1:8443", "--data-dir", str(data_dir)],
        check=True, capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    db = open_database(f"sqlite:///{data_dir / 'hub.db'}")
    try:
        _collect_and_read_back(db, RoundController(db, HubSettings(data_dir=data_dir)), data_dir, env)
    finally:
        db.close()


def _collect_and_read_back(db: Database, rc: RoundController, data_dir: Path, env: dict[str, str]) -> None:
    nodes = enroll(db, 3)
    round_id = _kept_round(db, rc)
    rng = np.random.default_rng(0)
    sent: dict[str, dict[str, np.ndarray]] = {}
    for k, node in enumerate(nodes[:2]):
        (task,) = rc.open_tasks(node)
        assert task.params_bytes < 64 and task.config == {"kept": "norm_tensors"}  # an empty npz
        expected = {e.name: e for e in task.expected}
        assert any(n.endswith("running_var") for n in expected)
        update = {
            n: (
                rng.uniform(0.1, 2.0, e.shape) if np.dtype(e.dtype).kind == "f" else np.full(e.shape, 7 + k)
            ).astype(e.dtype)
            for n, e in expected.items()
        }
        var = next(n for n in update if n.endswith("running_var"))
        with pytest.raises(UpdateRejected, match="negative variances"):
            answer(rc, task, node, {**update, var: -update[var]}, n=10)
        assert [t.task_id for t in rc.open_tasks(node)] == [task.task_id]  # still open, nothing kept
        assert answer(rc, task, node, update, n=30 * (k + 1))
        sent[node] = update
    rc.close_round(round_id)  # the deadline is not due: a round that lacks an answer waits
    assert rc.info(round_id).state is RoundState.COLLECTING  # the third node has not answered
    with db.session() as session:
        row = session.get(Round, round_id)
        assert row is not None
        row.deadline = row.created_at
    rc.close_round(round_id)
    assert rc.info(round_id).state is RoundState.PUBLISHED
    aggregate = rc.result(round_id)
    want = weighted_mean([sent[n] for n in nodes[:2]], [30, 60])
    for name, arr in want.items():
        np.testing.assert_array_equal(mean_part(aggregate)[name], arr, err_msg=name)
    for node in nodes[:2]:
        for name, arr in sent[node].items():
            np.testing.assert_array_equal(node_part(aggregate, node)[name], arr)
    assert node_part(aggregate, nodes[2]) == {}

    # models from-round: --kept-from must name a kept_tensors round, and --node a node that answered it.
    student = pneumonia_checkpoint(
        data_dir / "student", create_model("fl_cnn", norm="batch"), "fl_cnn", norm="batch"
    )
    number = str(rc.info(round_id).round)

    def from_round(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(HUB), "models", "from-round", *args, "--student", str(student), "--out",
             str(data_dir / "out"), "--model-version", "1.0.1", "--data-dir", str(data_dir)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip

    for args, said in (
        ((number, "--kept-from", "9"), "no round 9"),
        ((number, "--kept-from", number, "--node", "site-2"), "did not answer kept_tensors round"),
    ):
        done = from_round(*args)
        assert done.returncode != 0 and said in done.stderr, done.stderr
    assert not (data_dir / "out" / "bundle").exists()
    # These answers did not say which round trained them: the operator is told before anything is built.
    unnamed = from_round(number, "--kept-from", number, "--node", "site-0")
    said = "warning: node site-0 kept these tensors from its training in a round it did not name"
    assert said in " ".join(unnamed.stderr.split()), unnamed.stderr
