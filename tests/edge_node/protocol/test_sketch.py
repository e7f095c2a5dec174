"""pFedNet's sketch, as the node and the simulation compute it: torch's adaptive pooling, in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_node.protocol.sketch import FEATURE_MEAN, feature_mean, feature_mean_size, label_counts


@pytest.mark.parametrize(("channels", "height", "width"), [(1, 28, 28), (1, 30, 27), (3, 9, 13), (1, 4, 4)])
def test_feature_mean_is_the_mean_image_adaptively_pooled(channels: int, height: int, width: int) -> None:
    """Regions that do not divide the image overlap exactly as torch's adaptive average pooling's do."""
    x = np.random.default_rng(channels * height + width).random(
        (7, channels, height, width), dtype=np.float32
    )
    want = F.adaptive_avg_pool2d(torch.from_numpy(x).double().mean(dim=0, keepdim=True), 4).reshape(-1)
    got = feature_mean(x)
    assert got.dtype == np.float32 and got.shape == (feature_mean_size(channels),)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


def test_feature_mean_reads_where_the_bright_part_is() -> None:
    x = np.zeros((2, 1, 28, 28), np.float32)
    x[:, :, :, 21:] = 1.0  # the right quarter bright
    np.testing.assert_array_equal(feature_mean(x).reshape(4, 4), [[0, 0, 0, 1]] * 4)


def test_bad_input_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="N > 0"):
        feature_mean(np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="N > 0"):
        feature_mean(np.zeros((28, 28), np.float32))
    with pytest.raises(ValueError, match="smaller than the sketch"):
        feature_mean(np.zeros((2, 1, 3, 28), np.float32))
    with pytest.raises(ValueError, match=r"class indices 0\.\.1"):
        label_counts(np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="class indices"):
        label_counts(np.array([-1, 0]), 2)
    assert FEATURE_MEAN == "feature_mean"


def test_label_counts_count_every_class_even_an_absent_one() -> None:
    counts = label_counts(np.array([2, 0, 2, 2]), 4)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [1, 0, 3, 0])
    np.testing.assert_array_equal(label_counts(np.array([], np.int64), 2), [0, 0])
