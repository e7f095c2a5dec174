"""A clinic's sketch for pFedNet's similarity graph: what it trains on, in a few numbers, never per patient.

Two parts, each a tensor of a ``stats`` answer:

* ``label_counts`` (K,): how many training images the clinic holds of each class;
* ``feature_mean`` (C·S²,): the clinic's mean training image, in the [0, 1] grey values before the model's
  normalisation, averaged over S × S equal regions (S = ``SKETCH_SIDE`` = 4: sixteen numbers for a grey
  image, far too coarse to show any one patient). The regions follow adaptive average pooling: region i of
  H rows spans rows ⌊iH/S⌋ to ⌈(i+1)H/S⌉.

The simulation's clinics (``bench fl``) and a node answering the hub's task compute it with these functions,
so that both build the same graph. A node sends a sketch only over at least ``MIN_SKETCH_IMAGES`` images,
the floor its envelope sums keep.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FEATURE_MEAN",
    "LABEL_COUNTS",
    "MIN_SKETCH_IMAGES",
    "SKETCH_SIDE",
    "STATS_OF",
    "TRAINING_SET",
    "feature_mean",
    "feature_mean_size",
    "label_counts",
]

#: Tensor names of a sketch (and of a ``stats`` answer).
LABEL_COUNTS = "label_counts"
FEATURE_MEAN = "feature_mean"
#: A stats task whose config has ``STATS_OF = TRAINING_SET`` asks for the sketch of the node's labeled set.
STATS_OF = "stats_of"
TRAINING_SET = "training_set"
#: Regions per side of the pooled mean image.
SKETCH_SIDE = 4
#: The fewest training images a node describes in a sketch.
MIN_SKETCH_IMAGES = 10


def feature_mean_size(channels: int) -> int:
    """Length of ``feature_mean`` for images of ``channels`` channels."""
    return channels * SKETCH_SIDE * SKETCH_SIDE


def _bounds(length: int, side: int) -> list[tuple[int, int]]:
    """Adaptive pooling's regions along one axis: [⌊i·L/S⌋, ⌈(i+1)·L/S⌉) for i < S."""
    return [((i * length) // side, -((-(i + 1) * length) // side)) for i in range(side)]


def feature_mean(x01: np.ndarray) -> np.ndarray:
    """The mean image of ``x01`` (N, C, H, W) in [0, 1], pooled to SKETCH_SIDE² regions per channel:
    (C·S²,) float32, channel-major then row-major. Refuses an empty set or images smaller than S × S."""
    x = np.asarray(x01)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"a sketch needs images (N, C, H, W) with N > 0, got shape {list(x.shape)}")
    _, channels, height, width = x.shape
    if height < SKETCH_SIDE or width < SKETCH_SIDE:
        raise ValueError(
            f"images of {height}×{width} are smaller than the sketch's {SKETCH_SIDE}×{SKETCH_SIDE}"
        )
    mean = x.astype(np.float64).mean(axis=0)  # (C, H, W)
    rows, cols = _bounds(height, SKETCH_SIDE), _bounds(width, SKETCH_SIDE)
    pooled = np.array(
        [[[mean[c, r0:r1, c0:c1].mean() for c0, c1 in cols] for r0, r1 in rows] for c in range(channels)]
    )  # (C, S, S)
    return pooled.reshape(-1).astype(np.float32)


def label_counts(y: np.ndarray, num_classes: int) -> np.ndarray:
    """How many of the class indices ``y`` (N,) fall in each of ``num_classes`` classes: (K,) int64.
    Refuses an index outside 0..K−1."""
    labels = np.asarray(y).reshape(-1)
    if labels.size and (
        labels.min() < 0 or labels.max() >= num_classes or np.any(labels != np.round(labels))
    ):
        raise ValueError(f"labels must be class indices 0..{num_classes - 1}")
    return np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.int64)
