"""A learner that runs in another process (the torch learner of ``fedclinic[train]``), through files.

The node never imports torch: it writes the task, the params and its training set into a work directory,
runs the configured command with that directory as its one argument, and reads back the update. The
contract (docs/learners.md):

* ``task.json``: the wire task's ``task_id``, ``kind``, ``round``, ``strategy``, ``config`` and ``expected``
  (name, shape, dtype of each tensor the update must hold);
* ``params.npz``: the task's params; ``train.npz``: ``x`` float32 (N, C, H, W), preprocessed exactly as for
  inference, ``y`` int64 (N,) class indices and, when the node knows it, the normalisation ``x`` carries
  (``mean``, ``std`` float64, per channel or one for all: the installed bundle's);
* ``private/``: kept between tasks, never read by the node and never sent (a large client's private model,
  personal heads, the learner's random state);
* the command writes ``update.npz`` (exactly the expected tensors) and ``result.json``
  (``{"num_examples": int, "metrics": {name: float}}``) and exits 0.

A timeout, a non-zero exit, or missing or ill-shaped output is a TaskError with the reason: the node skips
the task rather than sending a guess.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edge_node.learning.training_set import TrainingSet
from edge_node.protocol.durable_file import write_bytes_durably, write_text_durably
from edge_node.protocol.errors import EncodingError
from edge_node.protocol.tensors import Tensors, decode_tensors, encode_tensors
from edge_node.protocol.wire import Task
from edge_node.uplink.tasks import TaskAnswer, TaskError

__all__ = ["TASK_FILE", "UPDATE_FILE", "ExternalLearner", "learner_dir", "read_answer"]

logger = logging.getLogger(__name__)

TASK_FILE = "task.json"
PARAMS_FILE = "params.npz"
TRAIN_FILE = "train.npz"
UPDATE_FILE = "update.npz"
RESULT_FILE = "result.json"
PRIVATE_DIR = "private"
#: How much of the learner's stderr a refusal quotes (its own messages; it never sees DICOM elements).
STDERR_TAIL = 600


def learner_dir(data_dir: Path) -> Path:
    """The external learner's work directory (its ``private/`` state lives inside and never leaves)."""
    return data_dir / "learning" / "torch"


class ExternalLearner:
    """Answers training tasks by running ``command`` + [work directory]; one task at a time per node."""

    def __init__(self, command: Sequence[str], workdir: Path, *, timeout_s: float = 3600.0) -> None:
        if not command:
            raise ValueError("the external learner needs a command")
        self.command = list(command)
        self.workdir = workdir
        self.timeout_s = timeout_s

    @property
    def private_dir(self) -> Path:
        return self.workdir / PRIVATE_DIR

    def answer(self, task: Task, params: Tensors, training_set: TrainingSet) -> TaskAnswer:
        """Run the learner on ``training_set`` for ``task``; TaskError (with why) when it gives no answer."""
        if len(training_set) == 0:
            raise TaskError("no labeled examples to train on")
        self._prepare(task, params, training_set)
        started = time.monotonic()
        try:
            done = subprocess.run(
                [*self.command, str(self.workdir)],
                capture_output=True,
                timeout=self.timeout_s,
                cwd=self.workdir,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TaskError(f"the learner ran past its {self.timeout_s:g} s limit and was stopped") from exc
        except OSError as exc:
            raise TaskError(f"the learner command {self.command[0]!r} cannot run: {exc.strerror}") from exc
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
            raise TaskError(f"the learner exited with status {done.returncode}: {tail or 'no message'}")
        answer = read_answer(self.workdir, task)
        logger.info(
            "learning: task %s (%s, round %d) trained on %d examples in %.1f s",
            task.task_id,
            task.kind.value,
            task.round,
            len(training_set),
            time.monotonic() - started,
        )
        return answer

    def _prepare(self, task: Task, params: Tensors, training_set: TrainingSet) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.private_dir.mkdir(mode=0o700, exist_ok=True)
        # An answer left by an earlier task must never be read as this one's.
        for name in (UPDATE_FILE, RESULT_FILE):
            (self.workdir / name).unlink(missing_ok=True)
        document = {
            "task_id": task.task_id,
            "kind": task.kind.value,
            "round": task.round,
            "strategy": task.strategy,
            "config": task.config,
            "expected": [spec.model_dump(mode="json") for spec in task.expected],
        }
        write_text_durably(self.workdir / TASK_FILE, json.dumps(document, indent=2))
        write_bytes_durably(self.workdir / PARAMS_FILE, encode_tensors(params, compress=False))
        train: dict[str, np.ndarray] = {
            "x": np.ascontiguousarray(training_set.x, dtype=np.float32),  # (N, C, H, W)
            "y": np.ascontiguousarray(training_set.y, dtype=np.int64),  # (N,)
        }
        if training_set.mean is not None and training_set.std is not None:  # the normalisation x carries
            train["mean"] = np.asarray(training_set.mean, dtype=np.float64)  # (C,) or (1,)
            train["std"] = np.asarray(training_set.std, dtype=np.float64)
        write_bytes_durably(self.workdir / TRAIN_FILE, encode_tensors(train, compress=False))

    def forget(self) -> None:
        """Remove everything the learner kept, private state included (a node leaving the federation)."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def _result(workdir: Path) -> tuple[int, dict[str, float]]:
    path = workdir / RESULT_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise TaskError(f"the learner wrote no {RESULT_FILE}") from exc
    except (OSError, ValueError) as exc:
        raise TaskError(f"the learner's {RESULT_FILE} is not JSON: {exc}") from exc
    if not isinstance(document, Mapping):
        raise TaskError(f"the learner's {RESULT_FILE} is not an object")
    num = document.get("num_examples")
    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
        raise TaskError(f"the learner's {RESULT_FILE} has no non-negative integer num_examples")
    raw = document.get("metrics", {})
    if not isinstance(raw, Mapping):
        raise TaskError(f"the learner's {RESULT_FILE} metrics are not an object")
    metrics: dict[str, float] = {}
    for name, value in raw.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TaskError(f"metric {name!r} in {RESULT_FILE} is not a number")
        if math.isfinite(value):  # a NaN loss says nothing the hub can use; the envelope stays finite
            metrics[str(name)] = float(value)
    return num, metrics


def read_answer(workdir: Path, task: Task) -> TaskAnswer:
    """The learner's answer in ``workdir``, checked against what ``task`` expects (names, shapes, dtypes)."""
    path = workdir / UPDATE_FILE
    try:
        tensors = decode_tensors(path.read_bytes())
    except FileNotFoundError as exc:
        raise TaskError(f"the learner wrote no {UPDATE_FILE}") from exc
    except EncodingError as exc:
        raise TaskError(f"the learner's {UPDATE_FILE} is unreadable: {exc}") from exc
    expected = {spec.name: spec for spec in task.expected}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise TaskError(
            f"the learner's update does not hold the expected tensors (missing {missing[:5]}, "
            f"unexpected {extra[:5]})"
        )
    for name, spec in expected.items():
        arr = tensors[name]
        if list(arr.shape) != list(spec.shape) or arr.dtype != np.dtype(spec.dtype):
            raise TaskError(
                f"the learner's {name!r} is {arr.dtype} {list(arr.shape)}, the task expects "
                f"{spec.dtype} {spec.shape}"
            )
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise TaskError(f"the learner's {name!r} holds NaN or infinite values")
    num, metrics = _result(workdir)
    return TaskAnswer({name: tensors[name] for name in expected}, num, metrics)
