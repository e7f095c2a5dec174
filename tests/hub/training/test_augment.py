"""Intensity augmentation: shape, range, reproducibility, and that sigma 0 leaves the image alone."""

from __future__ import annotations

import torch

from hub.training.augment import IntensityAugment, _blur


def test_augment_keeps_shape_and_range_and_is_reproducible() -> None:
    x = torch.rand(16, 1, 28, 28)
    aug = IntensityAugment()
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)


def test_probability_zero_is_identity() -> None:
    x = torch.rand(4, 1, 28, 28)
    out = IntensityAugment(p=0.0)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x)


def test_blur_per_image_sigma() -> None:
    x = torch.zeros(2, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    out = _blur(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], x[0])  # sigma 0: untouched
    assert float(out[1, 0, 4, 4]) < 1.0
    assert abs(float(out[1].sum()) - 1.0) < 1e-5  # a normalised kernel keeps the mass
