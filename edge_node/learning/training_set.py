"""What a node learns from: its labeled instances, and the arrays a learner trains on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LabeledInstance", "TrainingSet"]


@dataclass(frozen=True)
class LabeledInstance:
    """One spooled instance with the label a clinician (or an imported archive) gave its study or itself."""

    sop_instance_uid: str
    study_instance_uid: str
    #: The Part 10 file in the node's spool.
    path: Path
    #: A class name of the installed model's task.
    label: str
    #: Where the label came from: ``page`` (the local web page) or ``import`` (a labeled archive).
    source: str


@dataclass(frozen=True)
class TrainingSet:
    """Inputs preprocessed exactly as for inference, with class indices of the model's task."""

    #: (N, C, H, W) float32.
    x: np.ndarray
    #: (N,) int64 class indices.
    y: np.ndarray
    sop_instance_uids: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x {list(self.x.shape)} and y {list(self.y.shape)} do not describe N examples")
        if len(self.sop_instance_uids) != self.y.shape[0]:
            raise ValueError("one SOP Instance UID per example")

    def __len__(self) -> int:
        return int(self.y.shape[0])
