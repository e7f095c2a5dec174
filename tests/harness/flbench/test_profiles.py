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
    jpeg_quantize,
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


def test_operations_outside_the_augmentation_envelope() -> None:
    x = np.full((2, 28, 28), 0.25, dtype=np.float32)
    np.testing.assert_allclose(render(x, AcquisitionProfile(invert=True), np.random.default_rng(0)), 0.75)
    crop = render(x, AcquisitionProfile(collimation=0.1), np.random.default_rng(0))
    assert crop[:, :3, :].max() == 0.0 and crop[:, :, -3:].max() == 0.0 and crop[:, 14, 14].min() == 0.25
    # Poisson noise at 100 photons per unit: mean kept, variance = mean / photons.
    big = np.full((50, 28, 28), 0.5, dtype=np.float32)
    noisy = render(big, AcquisitionProfile(poisson_photons=100.0), np.random.default_rng(0))
    assert noisy.mean() == pytest.approx(0.5, abs=0.005)
    assert noisy.var() == pytest.approx(0.5 / 100, rel=0.05)
    speckle = render(big, AcquisitionProfile(speckle_sd=0.2), np.random.default_rng(0))
    assert speckle.std() == pytest.approx(0.5 * 0.2, rel=0.05)


def test_jpeg_quantisation_loses_more_at_low_quality_and_keeps_flat_images() -> None:
    # A flat image stays flat; only its level moves, by at most half the DC step (table 16 × 5 at q 10 → 80,
    # i.e. 80 / 8 = 10 grey levels with the orthonormal DCT).
    flat = np.full((1, 28, 28), 100 / 255, dtype=np.float32)
    out = jpeg_quantize(flat, 10)
    assert out.std() < 1e-5 and abs(float(out.mean()) - 100 / 255) <= 5 / 255 + 1e-6
    x = np.random.default_rng(3).random((4, 28, 28)).astype(np.float32)
    err = {q: float(np.abs(jpeg_quantize(x, q) - x).mean()) for q in (10, 50, 95)}
    assert err[10] > err[50] > err[95] > 0
    with pytest.raises(ValueError, match="1–100"):
        jpeg_quantize(x, 0)


def test_small_rotation_moves_an_off_centre_dot() -> None:
    x = np.zeros((1, 28, 28), dtype=np.float32)
    x[0, 4, 14] = 1.0  # near the top edge, on the vertical axis
    y = render(x, AcquisitionProfile(rotate_deg=10.0), np.random.default_rng(0))
    assert y[0, 4, 14] < 0.5 and y.sum() == pytest.approx(1.0, abs=0.2)
