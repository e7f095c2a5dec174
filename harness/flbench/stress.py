"""Validation under stress: each clinic's validation images pushed past the training augmentation's ranges.

The out-of-envelope panel is test data: nothing may be chosen on it. A choice that should favour models
that hold up on scanners unlike the training ones can look instead at the clinics' *validation* images
under changes the augmentation never draws (as corruption-robustness benchmarks keep a few corruptions for
validation apart from those they test on). Each stress is one of the augmentation's own operations taken
beyond its range (``hub.training.augment.IntensityAugment``: gamma 0.55–1.82, contrast 0.65–1.35, blur
sigma ≤ 1.4, Gaussian noise sd ≤ 0.09); none is one of the panel's kinds (photon noise, speckle, JPEG,
inversion, rotation and collimation). Deterministic: every method sees the same stressed images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from harness.flbench.datasets import BenchData
from harness.flbench.scoring import Predictor, finite_mean, threshold_metrics
from hub.training.augment import gaussian_blur


@dataclass(frozen=True)
class Stress:
    """One operation at one strength, on rendered images in [0, 1], (N, 1, H, W) → the same, in [0, 1]."""

    op: Literal["gamma", "contrast", "blur", "noise"]
    value: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(0.0, 1.0)
        if self.op == "gamma":
            return x**self.value
        if self.op == "contrast":
            return ((x - 0.5) * self.value + 0.5).clamp(0.0, 1.0)
        if self.op == "blur":
            return gaussian_blur(x, torch.full((x.shape[0],), self.value, dtype=x.dtype))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        return (x + self.value * noise).clamp(0.0, 1.0)


STRESSES: dict[str, Stress] = {
    "gamma-3": Stress("gamma", 3.0),
    "gamma-0.33": Stress("gamma", 1 / 3),
    "contrast-0.35": Stress("contrast", 0.35),
    "blur-2.5": Stress("blur", 2.5),
    "noise-0.2": Stress("noise", 0.2),
}


def stress_validation(data: BenchData, per_clinic: Mapping[str, Predictor]) -> dict[str, float]:
    """Per stress: the mean over clinics of each clinic's validation AUC on its stressed validation images
    (a clinic without a validation split is left out); no test split is read."""
    return {
        name: finite_mean(
            [
                threshold_metrics(
                    data.clinics[c].val_y.numpy(), predictor(stress(data.clinics[c].val_x)), 0.0
                )["auc"]
                if len(data.clinics[c].val_y)
                else math.nan
                for c, predictor in per_clinic.items()
            ]
        )
        for name, stress in STRESSES.items()
    }
