"""Test-time augmentation: a model's mean logit over the image and augmented views of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.flbench.tta import tta_predictor
from hub.models.fl_cnn import fl_cnn
from hub.training.learners import AUGMENT, predict


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return fl_cnn(norm="group", num_outputs=1)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_one_view_is_the_plain_reading(model: torch.nn.Module, images: torch.Tensor) -> None:
    np.testing.assert_array_equal(tta_predictor(model, views=1)(images), predict(model, images))


def test_the_reading_is_the_mean_logit_over_the_views_and_the_same_on_every_call(
    model: torch.nn.Module, images: torch.Tensor
) -> None:
    read = tta_predictor(model, views=4, seed=7)
    gen = torch.Generator().manual_seed(7)
    views = [images] + [AUGMENT(images, gen) for _ in range(3)]
    expected = np.mean([predict(model, v) for v in views], axis=0)
    np.testing.assert_allclose(read(images), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(read(images), read(images))  # a fresh generator on each call
    assert not np.allclose(read(images), predict(model, images))  # the augmented views change the answer


def test_no_views_is_an_error(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="at least one view"):
        tta_predictor(model, views=0)
