"""Labeled instances → a TrainingSet: each spooled file read and preprocessed exactly as inference does."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_node.analysis.preprocessing import SkipReason, check_modality_value, preprocess
from edge_node.analysis.selection import read_instance
from edge_node.learning.training_set import LabeledInstance, TrainingSet
from edge_node.protocol.manifest import Preprocessing, TaskSpec

__all__ = ["Examples", "SkippedInstance", "training_set_from"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedInstance:
    sop_instance_uid: str
    #: PHI-free, e.g. "label 'maybe' is not a class of this model".
    reason: str


@dataclass(frozen=True)
class Examples:
    training_set: TrainingSet
    skipped: tuple[SkippedInstance, ...]


def _one(item: LabeledInstance, pre: Preprocessing, model_id: str, channels: int) -> np.ndarray:
    if not item.path.is_file():
        raise SkipReason("the file is no longer in the spool")
    header, ds = read_instance(item.path)
    check_modality_value(header.modality, pre, model_id)
    return preprocess(ds, pre, channels=channels).tensor  # (C, H, W)


def training_set_from(
    instances: Sequence[LabeledInstance],
    pre: Preprocessing,
    task: TaskSpec,
    *,
    model_id: str,
    channels: int = 1,
) -> Examples:
    """Every usable instance preprocessed as for inference; a bad one is skipped with its reason."""
    classes = {c.name: c.index for c in task.classes}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    uids: list[str] = []
    skipped: list[SkippedInstance] = []
    seen: set[str] = set()
    for item in instances:
        if item.sop_instance_uid in seen:
            continue  # one label per instance: a study label and an instance label never count twice
        seen.add(item.sop_instance_uid)
        if item.label not in classes:
            skipped.append(
                SkippedInstance(item.sop_instance_uid, f"label {item.label!r} is not a class of the model")
            )
            continue
        try:
            xs.append(_one(item, pre, model_id, channels))
        except SkipReason as exc:
            skipped.append(SkippedInstance(item.sop_instance_uid, exc.reason))
            continue
        ys.append(classes[item.label])
        uids.append(item.sop_instance_uid)
    for reason in sorted({s.reason for s in skipped}):  # reasons only: UIDs stay out of the log
        count = sum(1 for s in skipped if s.reason == reason)
        logger.info("%d labeled instance(s) not used for learning: %s", count, reason)
    h, w = pre.size
    x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, channels, h, w), dtype=np.float32)
    labels = np.asarray(ys, dtype=np.int64)
    return Examples(TrainingSet(x, labels, tuple(uids), tuple(pre.mean), tuple(pre.std)), tuple(skipped))
