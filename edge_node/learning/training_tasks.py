"""Answers to the tasks that need training on this node's labeled data (``weights_delta``: the torch learner).

A node without the learner, or without labeled data, refuses such a task with the reason; the uplink skips
it and says why in the log, rather than sending a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edge_node.learning.external import ExternalLearner
from edge_node.learning.options import LearningSettings
from edge_node.learning.prepared_set import read_prepared_set
from edge_node.learning.training_set import TrainingSet
from edge_node.protocol.tensors import Tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task
from edge_node.uplink.tasks import TaskAnswer, TaskError

__all__ = ["TRAINED_KINDS", "TrainingTaskAnswerer", "learner_dir"]

#: The kinds this answerer trains for.
TRAINED_KINDS = (UpdateKind.WEIGHTS_DELTA,)

#: Where the labeled examples come from; None when the node has none.
TrainingSetSource = Callable[[], TrainingSet | None]


def learner_dir(data_dir: Path) -> Path:
    """The external learner's work directory (its ``private/`` state lives inside and never leaves)."""
    return data_dir / "learning" / "torch"


class TrainingTaskAnswerer:
    """``weights_delta`` through the external torch learner, on the node's labeled training set."""

    def __init__(self, learner: ExternalLearner | None, training_set: TrainingSetSource) -> None:
        self.learner = learner
        self.training_set = training_set

    @classmethod
    def from_settings(cls, settings: LearningSettings, data_dir: Path) -> TrainingTaskAnswerer:
        learner = None
        if settings.torch_command is not None:
            learner = ExternalLearner(
                settings.torch_command, learner_dir(data_dir), timeout_s=settings.torch_timeout_s
            )
        path = settings.training_set_file

        def source() -> TrainingSet | None:
            if path is None:
                return None
            try:
                return read_prepared_set(path)
            except ValueError as exc:
                raise TaskError(str(exc)) from exc

        return cls(learner, source)

    def __call__(self, task: Task, params: Tensors) -> TaskAnswer:
        if task.kind not in TRAINED_KINDS:
            raise TaskError(f"tasks of kind {task.kind.value} are not trained by the torch learner")
        if self.learner is None:
            raise TaskError(
                "weights_delta needs the torch learner, which this node does not run "
                "(install fedclinic[train] and set [learning] torch_command)"
            )
        examples = self.training_set()
        if examples is None or len(examples) == 0:
            raise TaskError("this node has no labeled examples to train on")
        return self.learner.answer(task, params, examples)
