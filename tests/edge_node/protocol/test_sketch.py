"""pFedNet's sketch, as the node and the simulation compute it: torch's adaptive pooling, in numpy (no torch
here: the edge's tests run where torch is not installed)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.protocol.sketch import FEATURE_MEAN, feature_mean, feature_mean_size, label_counts


def test_regions_that_do_not_divide_the_image_overlap_as_adaptive_pooling_does() -> None:
    """5 rows into 4 regions: rows [0, 2), [1, 3), [2, 4), [3, 5) (⌊i·5/4⌋ to ⌈(i+1)·5/4⌉); a torch-free
    check here, the comparison with torch itself is in tests/hub/training/test_pfednet_train.py."""
    x = np.zeros((1, 1, 5, 4), np.float32)
    x[0, 0, :, 0] = [0.0, 1.0, 2.0, 3.0, 4.0]  # one column: each region's mean of it is easy to read
    got = feature_mean(x).reshape(4, 4)
    np.testing.assert_allclose(got[:, 0], [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(got[:, 1:], 0.0)
    assert feature_mean(np.zeros((2, 3, 9, 13), np.float32)).shape == (feature_mean_size(3),)


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
