"""Training augmentations: intensity profiles (shape, range, reproducibility, sigma 0) and random
convolutions (scale, polarity, flat images, refusals)."""

from __future__ import annotations

import pytest
import torch

from hub.training.augment import IntensityAugment, RandomConvolution, gaussian_blur


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
    out = gaussian_blur(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], x[0])  # sigma 0: untouched
    assert float(out[1, 0, 4, 4]) < 1.0
    assert abs(float(out[1].sum()) - 1.0) < 1e-5  # a normalised kernel keeps the mass


def test_random_convolution_keeps_shape_is_reproducible_and_p0_is_identity() -> None:
    z = torch.randn(16, 1, 28, 28)
    rc = RandomConvolution(p=1.0)
    a = rc(z, torch.Generator().manual_seed(5))
    b = rc(z, torch.Generator().manual_seed(5))
    assert a.shape == z.shape
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, z)
    torch.testing.assert_close(RandomConvolution(p=0.0)(z, torch.Generator().manual_seed(5)), z)


def test_a_one_by_one_filter_scales_each_image_and_sometimes_turns_its_contrast_over() -> None:
    z = torch.randn(400, 1, 12, 12)
    out = RandomConvolution(kernel_sizes=(1,), p=1.0)(z, torch.Generator().manual_seed(0))
    scale = (out * z).sum(dim=(1, 2, 3)) / (z * z).sum(dim=(1, 2, 3))  # per image: out = scale · z
    torch.testing.assert_close(out, scale.reshape(-1, 1, 1, 1) * z)
    assert 0.03 < float((scale < 0).float().mean()) < 0.5  # α + (1 − α)·w < 0 for some draws


def test_a_larger_filter_changes_texture_but_keeps_a_flat_image_flat() -> None:
    flat = torch.full((8, 1, 10, 10), 0.7)
    out = RandomConvolution(kernel_sizes=(7,), p=1.0)(flat, torch.Generator().manual_seed(1))
    spread = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert float(spread.max()) < 1e-5  # replicate padding: no edge artefacts on a flat image
    z = torch.randn(8, 1, 10, 10)
    filtered = RandomConvolution(kernel_sizes=(7,), p=1.0)(z, torch.Generator().manual_seed(1))
    assert not torch.allclose(filtered / filtered.std(), z / z.std(), atol=0.1)


def test_random_convolution_refuses_what_it_cannot_filter() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        RandomConvolution()(torch.zeros(2, 3, 8, 8), torch.Generator().manual_seed(0))
    for sizes in [(1, 4), (), (-1,)]:
        with pytest.raises(ValueError, match="odd and positive"):
            RandomConvolution(kernel_sizes=sizes)
