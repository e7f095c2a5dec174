"""Validation under stress: every stress lies past the training augmentation, is the same for every method,
and the clinics' validation images (never their test images) are what it scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.flbench.datasets import BenchData
from harness.flbench.scoring import threshold_metrics
from harness.flbench.stress import STRESSES, Stress, stress_validation
from hub.training.augment import IntensityAugment
from hub.training.datasets import ClinicData


def test_every_stress_lies_past_the_range_the_augmentation_draws() -> None:
    aug = IntensityAugment()
    outside = {
        "gamma": lambda v: not math.exp(-aug.log_gamma) <= v <= math.exp(aug.log_gamma),
        "contrast": lambda v: not aug.contrast[0] <= v <= aug.contrast[1],
        "blur": lambda v: v > aug.blur_sigma[1],
        "noise": lambda v: v > aug.noise_sd,
    }
    assert {s.op for s in STRESSES.values()} == set(outside)
    for name, stress in STRESSES.items():
        assert outside[stress.op](stress.value), name


@pytest.mark.parametrize("name", list(STRESSES))
def test_a_stress_keeps_shape_and_range_and_is_the_same_every_time(name: str) -> None:
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    a, b = STRESSES[name](x), STRESSES[name](x.clone())
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)


def _clinic(name: str, n_val: int, seed: int) -> ClinicData:
    """Positives have a brighter centre square; the test split is NaN so that reading it would show."""
    gen = torch.Generator().manual_seed(seed)
    y = (torch.arange(max(n_val, 2)) % 2).float()
    x = 0.3 + 0.1 * torch.rand(len(y), 1, 16, 16, generator=gen)
    x[:, :, 5:11, 5:11] += 0.3 * y.reshape(-1, 1, 1, 1)
    nan = torch.full_like(x, math.nan)
    return ClinicData(name, x, y, nan, y, x[:n_val], y[:n_val])


def test_each_clinic_scores_its_own_stressed_validation_images_never_its_test_images() -> None:
    clinics = {c: _clinic(c, n, k) for k, (c, n) in enumerate([("A", 12), ("B", 10), ("C", 0)])}
    data = BenchData(
        "pneumonia",
        "combined",
        0,
        clinics,
        torch.zeros(2, 1, 16, 16),
        torch.zeros(2),
        torch.zeros(2, 1, 16, 16),
        torch.zeros(2),
        names=("A", "B", "C"),
        small=("C",),
    )

    def centre(x: torch.Tensor) -> np.ndarray:  # bright centre against its surround
        return (x[:, 0, 5:11, 5:11].mean(dim=(1, 2)) - x[:, 0].mean(dim=(1, 2))).numpy()

    seen: list[int] = []

    def counting(x: torch.Tensor) -> np.ndarray:
        seen.append(len(x))
        assert torch.isfinite(x).all()
        return centre(x)

    out = stress_validation(data, {"A": counting, "B": centre, "C": centre})
    assert set(out) == set(STRESSES) and all(0.0 <= v <= 1.0 for v in out.values())
    assert seen == [12] * len(STRESSES)  # A's validation split once per stress; C has none and is left out
    blur = Stress("blur", 2.5)
    expected = np.mean(
        [
            threshold_metrics(d.val_y.numpy(), centre(blur(d.val_x)), 0.0)["auc"]
            for d in (clinics["A"], clinics["B"])
        ]
    )
    assert out["blur-2.5"] == pytest.approx(expected)
    # A model that reads the noise rather than the square drops under stress where the square reader does not.
    noisy = stress_validation(data, dict.fromkeys("ABC", lambda x: x[:, 0, 0, :4].mean(dim=1).numpy()))
    assert noisy["noise-0.2"] < out["noise-0.2"]
