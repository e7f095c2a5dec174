"""Test-time augmentation: a model's logits averaged over the image and augmented views of it.

A node could score each image several times, under random acquisition profiles drawn like the training
augmentation's (``hub.training.learners.AUGMENT``), and report the mean logit. Averaging over views that
the model was trained to treat alike can steady its answer on an image whose own acquisition is unusual.
The views are drawn from a generator seeded afresh on every call, so a predictor answers the same images
the same way each time it is asked.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from hub.training.learners import AUGMENT, predict

__all__ = ["TTA_SEED", "TTA_VIEWS", "tta_predictor"]

#: The image itself and seven augmented views; fixed before any run, not tuned.
TTA_VIEWS = 8
TTA_SEED = 20261207


def tta_predictor(
    model: nn.Module, views: int = TTA_VIEWS, seed: int = TTA_SEED
) -> Callable[[torch.Tensor], np.ndarray]:
    """``x01`` (N, 1, H, W) in [0, 1] → the mean over ``views`` views of the model's logits (the first view
    is the image unaugmented)."""
    if views < 1:
        raise ValueError(f"test-time augmentation needs at least one view, got {views}")

    def run(x01: torch.Tensor) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed)
        total = predict(model, x01)
        for _ in range(views - 1):
            total = total + predict(model, AUGMENT(x01, gen))
        return total / views

    return run
