"""Fixtures for the hub.fl tests: a tiny hand-made model."""

from __future__ import annotations

import numpy as np
import pytest

from hub.fl.strategy import Params


@pytest.fixture
def tiny_model() -> Params:
    """conv.weight (2,), bn1.weight (1,), bn1.running_mean (1,), bn1.num_batches_tracked (), fc.bias (1,)."""
    return {
        "conv.weight": np.array([1.0, 2.0], dtype=np.float64),
        "bn1.weight": np.array([1.0], dtype=np.float64),
        "bn1.running_mean": np.array([0.0], dtype=np.float64),
        "bn1.num_batches_tracked": np.array(0, dtype=np.int64),
        "fc.bias": np.array([0.5], dtype=np.float64),
    }
