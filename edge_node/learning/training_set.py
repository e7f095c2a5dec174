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
    """Inputs preprocessed exactly as for inference, with class indices of the model's task.

    ``mean`` and ``std`` are the normalisation the inputs carry (the installed bundle's, per channel or one
    for all), when the node knows it: ``unit_range`` undoes it."""

    #: (N, C, H, W) float32.
    x: np.ndarray
    #: (N,) int64 class indices.
    y: np.ndarray
    sop_instance_uids: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x {list(self.x.shape)} and y {list(self.y.shape)} do not describe N examples")
        if len(self.sop_instance_uids) != self.y.shape[0]:
            raise ValueError("one SOP Instance UID per example")
        if (self.mean is None) != (self.std is None):
            raise ValueError("the normalisation needs both its mean and its std")
        if self.std is not None and self.mean is not None:
            if len(self.mean) not in (1, self.x.shape[1]) or len(self.std) != len(self.mean):
                raise ValueError(
                    f"the normalisation has {len(self.mean)} means for {self.x.shape[1]} channels"
                )
            if min(self.std) <= 0:
                raise ValueError("the normalisation's std must be positive")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def unit_range(self) -> np.ndarray:
        """The inputs before their normalisation, in [0, 1]: x · std + mean per channel, (N, C, H, W)
        float64. ValueError when the normalisation is not known."""
        if self.mean is None or self.std is None:
            raise ValueError("the training set does not say which normalisation its inputs carry")
        channels = self.x.shape[1]
        mean = np.resize(np.asarray(self.mean, dtype=np.float64), channels)[None, :, None, None]
        std = np.resize(np.asarray(self.std, dtype=np.float64), channels)[None, :, None, None]
        return self.x.astype(np.float64) * std + mean
