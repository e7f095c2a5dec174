"""The input envelope's intensity part: each image's grey-value quantiles against the validation images'.
On real BreastMNIST ultrasound a negative display lies outside it and looks negative, while the test split
and a dimmer display of it do not; augmented copies widen it to a lifted black level the model was trained
on, and the negative display still shows at the clinic level; a node's "looks negative" rule needs both
the excess and the majority."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_node.protocol.envelope import IntensityCheck, intensity_features, looks_negative
from export.envelope import (
    FOLDS,
    INTENSITY_COPIES,
    INTENSITY_LEVELS,
    MIN_IMAGES,
    augmented_copies,
    cross_fitted_distances,
    fit_intensity_envelope,
    ledoit_wolf,
)
from export.errors import ExportError
from hub.data.medmnist import load_medmnist


def test_the_features_are_each_images_grey_value_quantiles() -> None:
    ramp = np.linspace(0.0, 1.0, 101).reshape(1, 101)
    images = np.stack([ramp, 1.0 - ramp, np.full((1, 101), 0.3)])  # (3, 1, 101)
    f = intensity_features(images, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(f, [[0.1, 0.5, 0.9], [0.1, 0.5, 0.9], [0.3, 0.3, 0.3]], atol=1e-12)
    assert intensity_features(np.zeros((0, 4, 4)), [0.5]).shape == (0, 1)
    # numpy's default quantile, exactly; and an image's inverse from the same pass.
    rng = np.random.default_rng(1)
    grey = rng.random((20, 9, 11)) ** 3
    levels = [0.0, 0.02, 0.1, 0.5, 0.9, 0.98, 1.0]
    expected = np.quantile(grey.reshape(20, -1), levels, axis=1).T
    np.testing.assert_allclose(intensity_features(grey, levels), expected, rtol=0, atol=1e-12)
    check = IntensityCheck.of(fit_intensity_envelope(rng.random((60, 9, 11)), copies=0))
    own, inverse = check.features_and_inverse(grey)
    np.testing.assert_allclose(own, intensity_features(grey, check.levels), rtol=0, atol=1e-12)
    np.testing.assert_allclose(inverse, intensity_features(1.0 - grey, check.levels), rtol=0, atol=1e-12)


def test_a_negative_display_is_outside_and_looks_negative_on_real_ultrasound(shared_data: Path) -> None:
    val = load_medmnist("breastmnist", "val", shared_data).images / 255.0
    test = load_medmnist("breastmnist", "test", shared_data).images / 255.0
    env = fit_intensity_envelope(val, copies=0)  # the validation images alone: the sharpest per image
    assert env.levels == list(INTENSITY_LEVELS) and env.fitted_on == len(val) and env.augmented_copies == 0
    check = IntensityCheck.of(env)
    same = check.judge(test)
    assert same.outside.mean() < 0.05 and not same.negative.any()
    dimmer = check.judge(test * 0.6)  # a darker display: inside the validation images' variety
    assert dimmer.outside.mean() < 0.05
    inverted = check.judge(1.0 - test)
    assert inverted.outside.mean() > 0.6
    assert inverted.negative.mean() > 0.6 and not (inverted.negative & ~inverted.outside).any()
    np.testing.assert_array_equal(inverted.outside, inverted.ratio > 1.0)


def test_augmented_copies_take_in_a_lifted_black_level_and_still_name_a_negative_display(
    shared_data: Path,
) -> None:
    val = load_medmnist("breastmnist", "val", shared_data).images / 255.0
    test = load_medmnist("breastmnist", "test", shared_data).images / 255.0
    # A scanner with a lifted black level, a darker gamma and less contrast (the bench's clinic D): within
    # the training augmentation, so the model was trained on such images.
    lifted = np.clip((test**1.6 - 0.5) * 0.7 + 0.6, 0.0, 1.0)
    narrow = IntensityCheck.of(fit_intensity_envelope(val, copies=0))
    assert narrow.judge(lifted).outside.mean() > 0.9
    env = fit_intensity_envelope(val)
    assert env.augmented_copies == INTENSITY_COPIES and env.fitted_on == len(val)
    wide = IntensityCheck.of(env)
    assert wide.judge(lifted).outside.mean() < 0.05 and wide.judge(test).outside.mean() < 0.05
    # Fewer negative images fall outside the wider envelope, but a clinic sending them is still named.
    inverted = wide.judge(1.0 - test)
    n_out, n_neg = int(inverted.outside.sum()), int(inverted.negative.sum())
    assert 0.1 < n_out / len(test) < narrow.judge(1.0 - test).outside.mean()
    assert looks_negative(n_out, n_neg, len(test), env.quantile)
    # The copies come from the training augmentation, reproducibly per seed.
    np.testing.assert_array_equal(augmented_copies(val[:5], 2, seed=1), augmented_copies(val[:5], 2, seed=1))
    assert augmented_copies(val[:5], 2).shape == (10, 28, 28)


def test_an_image_and_its_copies_share_a_fold() -> None:
    rng = np.random.default_rng(0)
    e = rng.normal(size=(61, 3))  # 61: by row index alone, image 7's copy (row 68) lands in another fold
    rows = np.concatenate([e, e + 0.01])
    groups = np.tile(np.arange(61), 2)
    d = cross_fitted_distances(rows, groups=groups)
    # Row 68 (image 7's copy) is measured from the rows outside image 7's fold, which hold neither of them.
    held = rows[groups % FOLDS != 7 % FOLDS]
    cov, _ = ledoit_wolf(held)
    z = rows[68] - held.mean(axis=0)
    assert d[68] == pytest.approx(float(z @ np.linalg.solve(cov, z)), rel=1e-9)
    assert not np.allclose(cross_fitted_distances(rows)[68], d[68])


def test_noise_is_outside_without_looking_negative() -> None:
    rng = np.random.default_rng(0)
    val = np.clip(rng.normal(0.3, 0.1, (200, 16, 16)), 0, 1)  # dark images, moderate spread
    check = IntensityCheck.of(fit_intensity_envelope(val, copies=0))
    washed = check.judge(np.clip(rng.normal(0.3, 0.35, (100, 16, 16)), 0, 1))  # far wider spread
    assert washed.outside.mean() > 0.9 and washed.negative.mean() < 0.1
    flipped = check.judge(1.0 - np.clip(rng.normal(0.3, 0.1, (100, 16, 16)), 0, 1))
    assert flipped.outside.all() and flipped.negative.all()


def test_the_intensity_envelope_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ExportError, match="at least"):
        fit_intensity_envelope(np.zeros((MIN_IMAGES - 1, 8, 8)))
    with pytest.raises(ExportError, match=r"\(N, H, W\)"):
        fit_intensity_envelope(np.zeros(100))
    with pytest.raises(ExportError, match="copies"):
        fit_intensity_envelope(np.zeros((100, 8, 8)), copies=-1)


def test_a_clinic_looks_negative_on_an_excess_that_is_mostly_negative() -> None:
    assert looks_negative(60, 50, 200, 0.99)
    assert not looks_negative(60, 20, 200, 0.99)  # outside for another reason (noise, another body part)
    assert not looks_negative(4, 4, 200, 0.99)  # all negative, but no more than chance
    assert not looks_negative(0, 0, 200, 0.99) and not looks_negative(0, 0, 0, 0.99)
