"""The input envelope's intensity part: each image's grey-value quantiles against the validation images'.
On real BreastMNIST ultrasound a negative display lies outside it and looks negative, while the test split
and a dimmer display of it do not; a node's clinic-level "looks negative" rule needs both the excess and
the majority."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_node.protocol.envelope import IntensityCheck, intensity_features, looks_negative
from export.envelope import INTENSITY_LEVELS, MIN_IMAGES, fit_intensity_envelope
from export.errors import ExportError
from hub.data.medmnist import load_medmnist


def test_the_features_are_each_images_grey_value_quantiles() -> None:
    ramp = np.linspace(0.0, 1.0, 101).reshape(1, 101)
    images = np.stack([ramp, 1.0 - ramp, np.full((1, 101), 0.3)])  # (3, 1, 101)
    f = intensity_features(images, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(f, [[0.1, 0.5, 0.9], [0.1, 0.5, 0.9], [0.3, 0.3, 0.3]], atol=1e-12)
    assert intensity_features(np.zeros((0, 4, 4)), [0.5]).shape == (0, 1)


def test_a_negative_display_is_outside_and_looks_negative_on_real_ultrasound(shared_data: Path) -> None:
    val = load_medmnist("breastmnist", "val", shared_data).images / 255.0
    test = load_medmnist("breastmnist", "test", shared_data).images / 255.0
    env = fit_intensity_envelope(val)
    assert env.levels == list(INTENSITY_LEVELS) and env.fitted_on == len(val)
    check = IntensityCheck.of(env)
    same = check.judge(test)
    assert same.outside.mean() < 0.05 and not same.negative.any()
    dimmer = check.judge(test * 0.6)  # a darker display: inside the validation images' variety
    assert dimmer.outside.mean() < 0.05
    inverted = check.judge(1.0 - test)
    assert inverted.outside.mean() > 0.6
    assert inverted.negative.mean() > 0.6 and not (inverted.negative & ~inverted.outside).any()
    np.testing.assert_array_equal(inverted.outside, inverted.ratio > 1.0)


def test_noise_is_outside_without_looking_negative() -> None:
    rng = np.random.default_rng(0)
    val = np.clip(rng.normal(0.3, 0.1, (200, 16, 16)), 0, 1)  # dark images, moderate spread
    check = IntensityCheck.of(fit_intensity_envelope(val))
    washed = check.judge(np.clip(rng.normal(0.3, 0.35, (100, 16, 16)), 0, 1))  # far wider spread
    assert washed.outside.mean() > 0.9 and washed.negative.mean() < 0.1
    flipped = check.judge(1.0 - np.clip(rng.normal(0.3, 0.1, (100, 16, 16)), 0, 1))
    assert flipped.outside.all() and flipped.negative.all()


def test_the_intensity_envelope_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ExportError, match="at least"):
        fit_intensity_envelope(np.zeros((MIN_IMAGES - 1, 8, 8)))
    with pytest.raises(ExportError, match=r"\(N, H, W\)"):
        fit_intensity_envelope(np.zeros(100))


def test_a_clinic_looks_negative_on_an_excess_that_is_mostly_negative() -> None:
    assert looks_negative(60, 50, 200, 0.99)
    assert not looks_negative(60, 20, 200, 0.99)  # outside for another reason (noise, another body part)
    assert not looks_negative(4, 4, 200, 0.99)  # all negative, but no more than chance
    assert not looks_negative(0, 0, 200, 0.99) and not looks_negative(0, 0, 0, 0.99)
