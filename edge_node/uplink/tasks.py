"""Answers to the hub's tasks that need no training: ``stats`` (numpy) and ``public_logits`` (ONNX forward).

Both build exactly the tensors the task lists in ``expected`` (name, shape, dtype), so the hub's validation
sees what it asked for; a task the node cannot answer (an unknown statistic, no model for logits, anchors of
the wrong shape) raises TaskError with the reason, and the node skips it rather than sending a guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_node.inference.loaded_model import MAX_BATCH, LoadedModel
from edge_node.protocol.sketch import LABEL_COUNTS
from edge_node.protocol.tensors import Tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task, TensorShape
from edge_node.uplink.errors import UplinkError

__all__ = ["ANSWERABLE_KINDS", "LocalStats", "TaskAnswer", "TaskError", "answer_task", "forward_logits"]

#: Names under which the hub may send the public anchor inputs in a task's params.
ANCHOR_NAMES = ("anchors", "inputs", "public_inputs")
#: The kinds a node answers without a learner (the learners that train arrive with clinic learning).
ANSWERABLE_KINDS = (UpdateKind.STATS, UpdateKind.PUBLIC_LOGITS)


class TaskError(UplinkError):
    """The node cannot answer this task (says why); it is skipped, not answered with a guess."""


@dataclass(frozen=True)
class LocalStats:
    """What the node knows of its own cases, never per patient: counts per class of its analysed studies."""

    label_counts: Mapping[str, int]
    num_examples: int


@dataclass(frozen=True)
class TaskAnswer:
    tensors: Tensors
    num_examples: int
    metrics: dict[str, float]


def _shape_problem(arr: np.ndarray, spec: TensorShape) -> str | None:
    if list(arr.shape) != list(spec.shape):
        return f"{spec.name!r} would have shape {list(arr.shape)}, the task expects {spec.shape}"
    return None


def _stats(task: Task, stats: LocalStats, classes: Sequence[str]) -> TaskAnswer:
    out: Tensors = {}
    for spec in task.expected:
        if spec.name != LABEL_COUNTS:
            raise TaskError(f"statistic {spec.name!r} is not one this node computes (only {LABEL_COUNTS!r})")
        k = spec.shape[0] if spec.shape else 0
        names = list(classes)[:k] if classes else []
        counts = [stats.label_counts.get(name, 0) for name in names] + [0] * (k - len(names))
        arr = np.asarray(counts, dtype=np.dtype(spec.dtype)).reshape(spec.shape)  # (K,)
        out[spec.name] = arr
    return TaskAnswer(out, stats.num_examples, {"studies": float(stats.num_examples)})


def forward_logits(model: LoadedModel, anchors: np.ndarray) -> np.ndarray:
    """Raw model outputs (N, K) for the anchor images (N, C, H, W): ONNX Runtime forward, no torch."""
    batch = np.asarray(anchors, dtype=model.backend.input_dtype)
    fixed = model.input_shape[0] if model.input_shape and model.input_shape[0] > 0 else 0
    step = fixed or MAX_BATCH
    parts = [np.asarray(model.backend.run(batch[i : i + step])) for i in range(0, batch.shape[0], step)]
    raw = np.concatenate(parts, axis=0)
    return raw.reshape(raw.shape[0], -1)


def _two_class(z: np.ndarray, positive: int) -> np.ndarray:
    """One sigmoid logit per image as two-class logits: softmax([0, z]) is exactly (1 - σ(z), σ(z))."""
    out = np.zeros((z.shape[0], 2), dtype=np.float64)  # (N, 2)
    out[:, positive] = z
    return out


def _public_logits(task: Task, params: Tensors, model: LoadedModel | None) -> TaskAnswer:
    if model is None:
        raise TaskError("public_logits needs a model and none is installed on this node")
    anchors = next((params[n] for n in ANCHOR_NAMES if n in params), None)
    if anchors is None:
        raise TaskError(f"the task's params hold no anchor images (one of {list(ANCHOR_NAMES)})")
    if anchors.ndim != 4 or not np.issubdtype(anchors.dtype, np.floating):
        raise TaskError(
            f"anchor images must be float (N, C, H, W); got {anchors.dtype} {list(anchors.shape)}"
        )
    if len(task.expected) != 1:
        raise TaskError(f"public_logits answers one tensor; the task expects {len(task.expected)}")
    spec = task.expected[0]
    try:
        logits = forward_logits(model, anchors)
    except Exception as exc:  # ORT raises its own types for inputs the model does not take
        raise TaskError(f"the model cannot run the anchor images ({type(exc).__name__})") from exc
    if logits.shape[1] == 1 and list(spec.shape)[1:] == [2] and model.task.output_activation == "sigmoid":
        logits = _two_class(logits[:, 0], model.task.positive_class)
    problem = _shape_problem(logits, spec)
    if problem is not None:
        raise TaskError(problem)
    return TaskAnswer(
        {spec.name: logits.astype(np.dtype(spec.dtype))},
        int(anchors.shape[0]),
        {"anchors": float(anchors.shape[0])},
    )


def answer_task(task: Task, params: Tensors, model: LoadedModel | None, stats: LocalStats) -> TaskAnswer:
    """The update for ``task``; TaskError when this node cannot compute that kind or those tensors."""
    if task.kind is UpdateKind.STATS:
        classes = [c.name for c in model.task.classes] if model is not None else list(stats.label_counts)
        return _stats(task, stats, classes)
    if task.kind is UpdateKind.PUBLIC_LOGITS:
        return _public_logits(task, params, model)
    raise TaskError(
        f"tasks of kind {task.kind.value} need a local learner, which this node does not run; "
        "it answers stats and public_logits"
    )
