"""Acquisition profiles: exact arithmetic on tiny images, strength scaling, resolution loss."""

from __future__ import annotations

import numpy as np
import pytest

from harness.flbench.profiles import (
    CLINIC_PROFILES,
    IDENTITY,
    UNSEEN_PROFILE,
    AcquisitionProfile,
    downsample_upsample,
    render,
)


def test_identity_profile_returns_the_image() -> None:
    x = np.random.default_rng(0).random((3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(render(x, IDENTITY, np.random.default_rng(1)), x, atol=1e-7)


def test_gamma_then_contrast_and_offset_around_half() -> None:
    x = np.array([[[0.25, 1.0], [0.0, 0.64]]], dtype=np.float32)
    prof = AcquisitionProfile(gamma=0.5, contrast=2.0, offset=0.1)
    # sqrt → [0.5, 1, 0, 0.8]; (v − 0.5)·2 + 0.5 + 0.1 → [0.6, 1.6, −0.4, 1.2]; clip → [0.6, 1, 0, 1]
    expected = np.array([[[0.6, 1.0], [0.0, 1.0]]], dtype=np.float32)
    np.testing.assert_allclose(render(x, prof, np.random.default_rng(0)), expected, atol=1e-6)


def test_resolution_loss_is_block_mean_repeated() -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    out = downsample_upsample(x)
    assert out[0, 0, 0] == out[0, 1, 1] == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert out[0, 3, 3] == pytest.approx((10 + 11 + 14 + 15) / 4)


def test_scaled_moves_every_parameter_toward_identity() -> None:
    f = CLINIC_PROFILES["F"]
    assert f.scaled(0.0) == AcquisitionProfile(
        gamma=1.0, contrast=1.0, blur_sigma=0.0, noise_sd=0.0, offset=0.0
    )
    half = f.scaled(0.5)
    assert half.gamma == pytest.approx(0.75**0.5)
    assert half.contrast == pytest.approx(1.0)
    assert half.blur_sigma == pytest.approx(0.4)
    assert half.offset == pytest.approx(-0.04)
    assert half.res_loss  # only from strength 0.5 on
    assert not f.scaled(0.4).res_loss


def test_noise_is_a_fixed_draw_per_rng_and_blur_stays_within_each_image() -> None:
    x = np.zeros((2, 8, 8), dtype=np.float32)
    x[0, 4, 4] = 1.0
    a = render(x, UNSEEN_PROFILE, np.random.default_rng(7))
    b = render(x, UNSEEN_PROFILE, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    blurred = render(x, AcquisitionProfile(blur_sigma=1.0), np.random.default_rng(0))
    assert blurred[1].max() == 0.0  # nothing leaks from image 0 into image 1
    assert 0 < blurred[0, 4, 4] < 1.0
