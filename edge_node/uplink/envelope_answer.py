"""The node's answers to the two envelope rounds: sums and distance counts over the images it analysed.

The features are those the node kept when it analysed each image with the bundle the rounds are about
(``envelope_results``: the embedding and the grey-value features its envelope judged), so nothing is run
again and the images are ones the model scored, not ones it was trained on. A node refuses, and tells the
hub why, when it serves another bundle, when that bundle's envelope has no grey-value part or other levels,
or when it analysed fewer than ``MIN_FOLD_IMAGES`` images with it: no sum over fewer leaves the node.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_node.inference.loaded_model import LoadedModel
from edge_node.protocol.envelope_moments import MIN_FOLD_IMAGES
from edge_node.protocol.envelope_rounds import (
    EMBEDDING,
    INTENSITY,
    EnvelopeRounds,
    node_histograms,
    node_moments,
)
from edge_node.protocol.tensors import Tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task
from edge_node.state.envelope_features import EnvelopeFeatures
from edge_node.uplink.tasks import TaskAnswer, TaskError

__all__ = ["ENVELOPE_KINDS", "EnvelopeRefused", "answer_envelope"]

ENVELOPE_KINDS = (UpdateKind.ENVELOPE_MOMENTS, UpdateKind.ENVELOPE_DISTANCES)

#: The kept features of a model version's analysed images: (model_id, model_version) → features.
FeatureReader = Callable[[str, str], EnvelopeFeatures]


class EnvelopeRefused(TaskError):
    """The node does not answer this envelope round, and tells the hub why."""


def _rounds(task: Task, model: LoadedModel | None) -> EnvelopeRounds:
    try:
        rounds = EnvelopeRounds.from_config(task.config)
    except ValueError as exc:
        raise TaskError(f"the envelope round's config is not one this node reads: {exc}") from exc
    if model is None:
        raise EnvelopeRefused("an envelope round needs the bundle it is about, and no model is installed")
    if (model.model_id, model.model_version) != (rounds.model_id, rounds.model_version):
        raise EnvelopeRefused(
            f"the round is about {rounds.model_id} {rounds.model_version}; this node serves "
            f"{model.model_id} {model.model_version}"
        )
    if model.intensity is None:
        raise EnvelopeRefused(
            f"{model.model_id} {model.model_version} has no grey-value envelope, so this node kept no "
            "grey-value features of its images"
        )
    if tuple(model.intensity.levels) != rounds.levels:
        raise EnvelopeRefused("the round's grey-value levels are not the bundle's")
    return rounds


def _features(rounds: EnvelopeRounds, read: FeatureReader) -> tuple[list[str], dict[str, np.ndarray]]:
    kept = read(rounds.model_id, rounds.model_version)
    n = len(kept.keys)
    if n < MIN_FOLD_IMAGES or kept.intensity is None:
        raise EnvelopeRefused(
            f"this node analysed {n} images with {rounds.model_id} {rounds.model_version} and kept their "
            f"features; it sends sums over at least {MIN_FOLD_IMAGES}"
        )
    if kept.embedding.shape != (n, rounds.embedding_dim) or kept.intensity.shape != (n, len(rounds.levels)):
        raise EnvelopeRefused("the kept features do not have the dimensions the round asks for")
    return list(kept.keys), {EMBEDDING: kept.embedding, INTENSITY: kept.intensity}


def answer_envelope(
    task: Task, params: Tensors, model: LoadedModel | None, read: FeatureReader
) -> TaskAnswer:
    """The node's answer to an envelope round (``ENVELOPE_KINDS``); EnvelopeRefused says why it has none."""
    rounds = _rounds(task, model)
    keys, features = _features(rounds, read)
    if task.kind is UpdateKind.ENVELOPE_MOMENTS:
        tensors = node_moments(features, keys, rounds)
    elif task.kind is UpdateKind.ENVELOPE_DISTANCES:
        try:
            tensors = node_histograms(features, keys, rounds, params)
        except (KeyError, ValueError) as exc:
            raise TaskError(f"the round's held-out envelopes do not fit this bundle: {exc}") from exc
    else:
        raise TaskError(f"{task.kind.value} is not an envelope round")
    expected = {spec.name: (list(spec.shape), np.dtype(spec.dtype)) for spec in task.expected}
    got = {name: (list(arr.shape), arr.dtype) for name, arr in tensors.items()}
    if got != expected:
        raise TaskError("the round expects other tensors than this node computes for it")
    return TaskAnswer(tensors, len(keys), {"images": float(len(keys))})
