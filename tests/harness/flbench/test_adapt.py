"""AdaBN: BatchNorm statistics re-estimated on a new clinic's unlabeled images, weights untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.flbench.adapt import adapt_norms
from hub.models.fl_cnn import fl_cnn
from hub.training.learners import normalize


def _pointwise() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4, eps=1e-9), nn.Flatten())  # eps: nothing
    model.eval()
    return model


def test_an_intensity_change_is_undone_by_the_re_estimated_statistics() -> None:
    # A 1x1 conv is affine in the pixels, so a scanner that maps x to 0.6 x + 0.3 moves each channel's mean
    # and scale and nothing else: statistics re-estimated on its images give the original activations back.
    model = _pointwise()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 8, 8, generator=gen)
    shifted = 0.6 * x + 0.3
    trained_here = adapt_norms(model, x)
    on_own = trained_here(normalize(x))
    assert torch.allclose(adapt_norms(model, shifted)(normalize(shifted)), on_own, atol=1e-4)
    # Without re-estimating, the new scanner's activations are off.
    assert not torch.allclose(trained_here(normalize(shifted)), on_own, atol=1e-2)


def test_weights_and_the_original_model_are_untouched() -> None:
    model = fl_cnn(norm="batch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 0.5
    adapted = adapt_norms(model, images, batch=4)  # three batches, one of two images
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    state = adapted.state_dict()
    moved = [k for k in before if not torch.equal(state[k], before[k])]
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)
    assert not adapted.training


def test_a_groupnorm_model_has_nothing_to_adapt() -> None:
    model = fl_cnn(norm="group").eval()
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert torch.equal(adapt_norms(model, images)(images), model(images))


def test_no_images_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        adapt_norms(_pointwise(), torch.zeros(0, 1, 8, 8))
