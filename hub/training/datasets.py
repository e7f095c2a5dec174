"""What a simulated clinic holds for training: its images and labels, and the model input normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Model input normalisation applied after rendering (and after augmentation): (x - mean) / std.
NORM_MEAN = 0.5
NORM_STD = 0.25


@dataclass(frozen=True)
class ClinicData:
    """One clinic's rendered images in [0, 1], (N, 1, H, W) float32, labels (N,) float32 class ids
    (0/1 for a binary task, 0..K−1 for a K-class one).

    The validation split (empty when a clinic has none) is what thresholds and any model or round
    selection may look at; the test split is read once, at the end.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor = field(default_factory=lambda: torch.empty(0, 1, 28, 28))
    val_y: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def n_train(self) -> int:
        return int(self.train_y.shape[0])
