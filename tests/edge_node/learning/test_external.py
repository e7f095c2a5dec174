"""The external learner's file contract: a good answer passes; a slow, failing or wrong learner is refused
with the reason, and nothing is guessed. The "learners" here are small Python programs (no torch)."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edge_node.inference.personal_head import PersonalHeadStore
from edge_node.learning.dispatch import Learners, LearningRefused, answer
from edge_node.learning.external import ExternalLearner
from edge_node.learning.prepared_set import read_prepared_set, write_prepared_set
from edge_node.learning.training_set import TrainingSet
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task, TaskState, TensorShape
from edge_node.uplink.tasks import LocalStats, TaskError

#: Writes an update of the expected tensors: params + the mean of x, so the test can tell it read train.npz.
#: ``MODE`` bends it into each way a learner can be wrong.
LEARNER = """
import json, sys, time
from pathlib import Path
import numpy as np
MODE = {mode!r}
work = Path(sys.argv[1])
task = json.loads((work / "task.json").read_text())
params = dict(np.load(work / "params.npz", allow_pickle=False))
train = dict(np.load(work / "train.npz", allow_pickle=False))
private = work / "private"
runs = int((private / "runs").read_text()) if (private / "runs").exists() else 0
(private / "runs").write_text(str(runs + 1))
if MODE == "sleep":
    time.sleep(30)
if MODE == "crash":
    sys.stderr.write("out of memory on the GPU\\n")
    sys.exit(3)
out = {{}}
for e in task["expected"]:
    out[e["name"]] = (params[e["name"]] + train["x"].mean()).astype(e["dtype"])
if MODE == "shape":
    out["w"] = np.zeros((5,), dtype="float32")
if MODE == "nan":
    out["w"][0] = np.nan
if MODE == "missing":
    out.pop("w")
if MODE != "no-update":
    np.savez(work / "update.npz", **out)
result = {{"num_examples": int(train["y"].shape[0]), "metrics": {{"train_loss": 0.5, "runs": runs + 1}}}}
if MODE == "bad-result":
    result = {{"num_examples": -1}}
(work / "result.json").write_text(json.dumps(result))
"""


def _command(tmp_path: Path, mode: str) -> list[str]:
    script = tmp_path / f"learner-{mode}.py"
    script.write_text(textwrap.dedent(LEARNER.format(mode=mode)))
    return [sys.executable, str(script)]


def _task(kind: UpdateKind = UpdateKind.WEIGHTS_DELTA) -> Task:
    return Task(
        task_id="t1",
        round_id="r1",
        round=1,
        kind=kind,
        strategy="fedavg",
        config={"epochs": 1},
        deadline=datetime.now(timezone.utc) + timedelta(hours=1),
        state=TaskState.OPEN,
        params_sha256=hashlib.sha256(b"").hexdigest(),
        params_bytes=0,
        expected=[TensorShape(name="w", shape=[2, 3], dtype="float32")],
        max_update_bytes=1 << 20,
    )


def _training_set(n: int = 6) -> TrainingSet:
    x = np.full((n, 1, 4, 4), 0.25, dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % 2
    return TrainingSet(x=x, y=y, sop_instance_uids=tuple(f"1.2.3.{i}" for i in range(n)))


PARAMS = {"w": np.ones((2, 3), dtype=np.float32)}


def test_a_good_answer_is_read_and_private_state_persists(tmp_path: Path) -> None:
    learner = ExternalLearner(_command(tmp_path, "good"), tmp_path / "work")
    answer = learner.answer(_task(), PARAMS, _training_set())
    np.testing.assert_array_equal(answer.tensors["w"], np.full((2, 3), 1.25, dtype=np.float32))
    assert answer.num_examples == 6
    assert answer.metrics["runs"] == 1.0
    again = learner.answer(_task(), PARAMS, _training_set())
    assert again.metrics["runs"] == 2.0  # private/ survived the first task
    task_doc = json.loads((tmp_path / "work" / "task.json").read_text())
    assert task_doc["kind"] == "weights_delta" and task_doc["expected"][0]["shape"] == [2, 3]
    with np.load(tmp_path / "work" / "train.npz", allow_pickle=False) as train:
        assert "mean" not in train.files  # the set did not say which normalisation it carries
    # A set that says it (the installed bundle's) hands it to the learner with the images.
    normalised = replace(_training_set(), mean=(0.5719,), std=(0.1684,))
    learner.answer(_task(), PARAMS, normalised)
    with np.load(tmp_path / "work" / "train.npz", allow_pickle=False) as train:
        np.testing.assert_array_equal(train["mean"], [0.5719])
        np.testing.assert_array_equal(train["std"], [0.1684])


def test_a_training_set_undoes_the_normalisation_it_names() -> None:
    x01 = np.linspace(0, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = ((x01 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))).astype(np.float32)
    data = TrainingSet(x, np.array([0, 1]), ("1.2.3.1", "1.2.3.2"), mean, std)
    np.testing.assert_allclose(data.unit_range(), x01, atol=1e-6)
    with pytest.raises(ValueError, match="does not say"):
        TrainingSet(x, np.array([0, 1]), ("1.2.3.1", "1.2.3.2")).unit_range()
    for bad_mean, bad_std, said in (
        ((0.5, 0.5), (0.25, 0.25), "2 means for 3 channels"),
        ((0.5,), (0.0,), "positive"),
        ((0.5,), None, "both"),
    ):
        with pytest.raises(ValueError, match=said):
            TrainingSet(x, np.array([0, 1]), ("1.2.3.1", "1.2.3.2"), bad_mean, bad_std)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("crash", "exited with status 3: out of memory on the GPU"),
        ("no-update", "wrote no update.npz"),
        ("shape", "'w' is float32 [5], the task expects float32 [2, 3]"),
        ("nan", "NaN or infinite"),
        ("missing", "missing ['w']"),
        ("bad-result", "non-negative integer num_examples"),
    ],
)
def test_a_wrong_learner_is_refused_with_the_reason(tmp_path: Path, mode: str, reason: str) -> None:
    learner = ExternalLearner(_command(tmp_path, mode), tmp_path / "work")
    with pytest.raises(TaskError) as caught:
        learner.answer(_task(), PARAMS, _training_set())
    assert reason in str(caught.value)


def test_an_answer_left_by_an_earlier_task_is_never_reused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    ExternalLearner(_command(tmp_path, "good"), work).answer(_task(), PARAMS, _training_set())
    with pytest.raises(TaskError, match=r"wrote no update\.npz"):
        ExternalLearner(_command(tmp_path, "no-update"), work).answer(_task(), PARAMS, _training_set())


def test_a_learner_past_its_time_is_stopped(tmp_path: Path) -> None:
    learner = ExternalLearner(_command(tmp_path, "sleep"), tmp_path / "work", timeout_s=2.0)
    with pytest.raises(TaskError, match="ran past its 2 s limit"):
        learner.answer(_task(), PARAMS, _training_set())


def test_a_missing_command_is_refused(tmp_path: Path) -> None:
    learner = ExternalLearner([str(tmp_path / "no-such-learner")], tmp_path / "work")
    with pytest.raises(TaskError, match="cannot run"):
        learner.answer(_task(), PARAMS, _training_set())


def test_the_dispatch_says_why_it_cannot_train(tmp_path: Path) -> None:
    stats = LocalStats(label_counts={}, num_examples=0)
    heads = PersonalHeadStore.in_data_dir(tmp_path)
    no_learner = Learners(labeled=list, personal_heads=heads)
    with pytest.raises(TaskError, match="torch learner"):
        answer(_task(), PARAMS, None, stats, no_learner)
    learner = ExternalLearner(_command(tmp_path, "good"), tmp_path / "work")
    no_data = Learners(labeled=list, personal_heads=heads, external=learner.answer)
    with pytest.raises(LearningRefused, match="needs a model"):
        answer(_task(), PARAMS, None, stats, no_data)
    path = tmp_path / "set.npz"
    write_prepared_set(path, _training_set())
    assert read_prepared_set(path).sop_instance_uids[1] == "1.2.3.1"
    ready = Learners(labeled=list, personal_heads=heads, external=learner.answer, prepared_set=path)
    assert answer(_task(), PARAMS, None, stats, ready).num_examples == 6
