"""One head_delta answer from embeddings: the light learner's step shared by real nodes and the simulation.

A node (``dispatch``) gets the embeddings and its served logits from its bundle's frozen backbone; the
benchmark's simulated clinics (``bench fl``'s ``light_head``) get them from the student's backbone, or from
the very bundle in the equality test. Both then call ``head_update`` with the task's config and params, so
the update that leaves a real node and the one the simulation aggregates come from the same code.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_node.learning.errors import LearningError
from edge_node.learning.light import HeadPair, LightConfig, LightLearner, LightResult
from edge_node.protocol.manifest import HeadSpec, TaskSpec

__all__ = ["checked_learner", "head_update"]


def checked_learner(
    head: HeadSpec,
    task: TaskSpec,
    config: Mapping[str, float | int | str | bool],
    params: Mapping[str, np.ndarray],
    expected: Mapping[str, list[int]],
) -> tuple[LightLearner, HeadPair]:
    """The learner for the task's config and the shared head it sent, checked against this model's head.

    Cheap (no backbone pass): a node runs it first, so a task for another head is refused at once.
    ``expected``: the tensor names and shapes the task asks for (the hub's view of the head).
    """
    learner = LightLearner(head, task, LightConfig.from_task(config))
    shared = learner.shared_from(params)
    mine = {head.weight.name: list(head.weight.shape), head.bias.name: list(head.bias.shape)}
    if dict(expected) != mine:
        raise LearningError(f"the task expects {dict(expected)}; this model's head is {mine}")
    return learner, shared


def head_update(
    head: HeadSpec,
    task: TaskSpec,
    config: Mapping[str, float | int | str | bool],
    params: Mapping[str, np.ndarray],
    expected: Mapping[str, list[int]],
    logits: np.ndarray,
    embeddings: np.ndarray,
    y: np.ndarray,
    personal: HeadPair | None,
) -> LightResult:
    """Train the shared and personal head for one task; LearningError says why a task cannot be answered.

    ``logits`` (N, K): what the clinic serves without its personal head; ``embeddings`` (N, D): the
    backbone's output; ``y`` (N,): class indices; ``personal``: the clinic's head from its last round, None
    for a fresh one.
    """
    learner, shared = checked_learner(head, task, config, params, expected)
    learner.check_labels(y)
    return learner.train(embeddings, y, shared, personal, served_logits=logits)
