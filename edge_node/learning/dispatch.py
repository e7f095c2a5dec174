"""Which learner answers a task: head_delta → the light learner, weights_delta → an external learner when one
is configured, kept_tensors (what a strategy left at the node, e.g. FedBN's normalisation tensors) → that
external learner too (they live in its private state), a stats task about the training set (pFedNet's
sketch) → the training set's sketch, other stats and public_logits → the answers that need no training.

A task the node cannot learn for (too few labels, a model without an embedding output) raises
``LearningRefused`` with the reason: the uplink tells the hub it refuses, and nothing is guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge_node.errors import ModelError
from edge_node.inference.loaded_model import LoadedModel
from edge_node.inference.personal_head import PersonalHead, PersonalHeadStore
from edge_node.learning.errors import LearningError
from edge_node.learning.examples import training_set_from
from edge_node.learning.head_update import checked_learner, head_update
from edge_node.learning.light import HeadPair
from edge_node.learning.prepared_set import read_prepared_set
from edge_node.learning.training_set import LabeledInstance, TrainingSet
from edge_node.protocol.sketch import (
    FEATURE_MEAN,
    LABEL_COUNTS,
    MIN_SKETCH_IMAGES,
    STATS_OF,
    TRAINING_SET,
    feature_mean,
    label_counts,
)
from edge_node.protocol.tensors import Tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task
from edge_node.uplink.tasks import LocalStats, TaskAnswer, TaskError, answer_task

__all__ = ["ExternalAnswer", "Learners", "LearningRefused", "answer"]

logger = logging.getLogger(__name__)

#: An external learner (e.g. torch in another process): the task, its params and the node's training set in,
#: the update out.
ExternalAnswer = Callable[[Task, Tensors, TrainingSet], TaskAnswer]


class LearningRefused(TaskError):
    """The node refuses the task and tells the hub why (too few labels, no embedding output, ...)."""


@dataclass
class Learners:
    """What a node learns with: its labels, its personal head file and, optionally, an external learner."""

    labeled: Callable[[], Sequence[LabeledInstance]]
    personal_heads: PersonalHeadStore
    external: ExternalAnswer | None = None
    #: A labeled set prepared once outside the node (e.g. a hospital's archive, see ``prepared_set``); when
    #: given, learners train on it instead of the label store's instances.
    prepared_set: Path | None = None


def _training_set(model: LoadedModel | None, learners: Learners) -> TrainingSet:
    """The labeled set, preprocessed as the installed model says, which also names its normalisation."""
    if learners.prepared_set is not None:
        try:
            prepared = read_prepared_set(learners.prepared_set)
        except ValueError as exc:
            raise LearningRefused(str(exc)) from exc
        if model is None:
            return prepared
        try:  # prepared "exactly as the installed bundle preprocesses": its normalisation
            pre = model.preprocessing
            return replace(prepared, mean=tuple(pre.mean), std=tuple(pre.std))
        except ValueError as exc:
            raise LearningRefused(f"the prepared set does not fit the installed model: {exc}") from exc
    if model is None:
        raise LearningRefused(
            "learning from labeled studies needs a model and none is installed on this node"
        )
    examples = training_set_from(
        learners.labeled(),
        model.preprocessing,
        model.task,
        model_id=model.model_id,
        channels=model.channels,
    )
    return examples.training_set


def _head_delta(task: Task, params: Tensors, model: LoadedModel | None, learners: Learners) -> TaskAnswer:
    if model is None:
        raise LearningRefused("head_delta needs a model and none is installed on this node")
    head = model.head
    if head is None:
        raise LearningRefused(
            f"model {model.model_id} {model.model_version} has no embedding output (exported before bundles "
            "carried one); the light learner needs a bundle that has it"
        )
    try:
        expected = {spec.name: list(spec.shape) for spec in task.expected}
        # Checked before the backbone runs: a task this node cannot answer is refused without that cost.
        learner, _ = checked_learner(head, model.task, task.config, params, expected)
        data = _training_set(model, learners)
        learner.check_labels(data.y)
        # One run of the frozen backbone: the model's own logits (the served shared head) and the embedding.
        logits, embeddings = model.logits_and_embedding(data.x)  # (N, K), (N, D)
        previous = learners.personal_heads.load()
        start = None
        if previous is not None and previous.misfit(model.manifest) is None:
            start = HeadPair(previous.weight, previous.bias)
        result = head_update(
            head, model.task, task.config, params, expected, logits, embeddings, data.y, start
        )
    except (LearningError, ModelError) as exc:
        raise LearningRefused(str(exc)) from exc
    learners.personal_heads.save(
        PersonalHead(
            weight=result.personal.weight,
            bias=result.personal.bias,
            model_id=model.model_id,
            trained_round=task.round,
            trained_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
    )
    logger.info(
        "light learner: round %d, %d examples, loss %.4f -> %.4f",
        task.round,
        result.num_examples,
        result.loss_before,
        result.loss_after,
    )
    tensors: Tensors = {name: np.asarray(arr, dtype=np.float32) for name, arr in result.shared_delta.items()}
    return TaskAnswer(
        tensors,
        result.num_examples,
        {"loss_before": result.loss_before, "loss_after": result.loss_after},
    )


def _external(task: Task, params: Tensors, model: LoadedModel | None, learners: Learners) -> TaskAnswer:
    """weights_delta and kept_tensors: the external learner, given the node's training set (kept_tensors
    reads its private state, and weighs it by the number of examples the node trains on)."""
    if learners.external is None:
        raise TaskError(
            f"{task.kind.value} needs the torch learner (the train extra), which this node does not run; "
            "it answers head_delta, stats and public_logits"
        )
    data = _training_set(model, learners)
    if len(data) == 0:
        raise LearningRefused("this node has no labeled examples to train on")
    return learners.external(task, params, data)


def _training_sketch(task: Task, model: LoadedModel | None, learners: Learners) -> TaskAnswer:
    """pFedNet's sketch of what this node trains on (``edge_node.protocol.sketch``): its labels' counts and
    its mean training image, pooled; over at least MIN_SKETCH_IMAGES images, never per patient."""
    if model is None:
        raise LearningRefused(
            "the sketch reads the training images in [0, 1], which needs the installed model's "
            "preprocessing; no model is installed on this node"
        )
    data = _training_set(model, learners)
    if len(data) < MIN_SKETCH_IMAGES:
        raise LearningRefused(
            f"this node has {len(data)} labeled examples; it sends a sketch over at least {MIN_SKETCH_IMAGES}"
        )
    out: Tensors = {}
    try:
        for spec in task.expected:
            if spec.name == LABEL_COUNTS and len(spec.shape) == 1:
                arr = label_counts(data.y, spec.shape[0])
            elif spec.name == FEATURE_MEAN:
                arr = feature_mean(data.unit_range())
            else:
                raise LearningRefused(
                    f"statistic {spec.name!r} {spec.shape} is not part of the sketch this node computes "
                    f"({LABEL_COUNTS!r} (K,), {FEATURE_MEAN!r})"
                )
            if list(arr.shape) != list(spec.shape):
                raise LearningRefused(
                    f"{spec.name!r} would have shape {list(arr.shape)}, the task expects {spec.shape}"
                )
            out[spec.name] = arr.astype(np.dtype(spec.dtype))
    except ValueError as exc:  # labels outside the task's classes, images smaller than the sketch
        raise LearningRefused(str(exc)) from exc
    logger.info("sketch of %d training images for round %d", len(data), task.round)
    return TaskAnswer(out, len(data), {"images": float(len(data))})


def answer(
    task: Task, params: Tensors, model: LoadedModel | None, stats: LocalStats, learners: Learners | None
) -> TaskAnswer:
    """The update for ``task`` from the learner its kind needs."""
    if task.kind is UpdateKind.STATS and task.config.get(STATS_OF) == TRAINING_SET:
        if learners is None:
            raise TaskError(
                "this stats task asks for a sketch of the node's labeled training set (pFedNet's graph); "
                "the node has no [learning] section, so it has none"
            )
        return _training_sketch(task, model, learners)
    if learners is not None and task.kind is UpdateKind.HEAD_DELTA:
        return _head_delta(task, params, model, learners)
    if learners is not None and task.kind in (UpdateKind.WEIGHTS_DELTA, UpdateKind.KEPT_TENSORS):
        return _external(task, params, model, learners)
    return answer_task(task, params, model, stats)
