"""A labeled training set prepared outside the node: preprocessed arrays in one npz file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_node.learning.training_set import TrainingSet
from edge_node.protocol.errors import EncodingError
from edge_node.protocol.tensors import decode_tensors, encode_tensors

__all__ = ["read_prepared_set", "write_prepared_set"]


def write_prepared_set(path: Path, training_set: TrainingSet) -> None:
    """Store ``training_set`` as npz (x, y, sop_instance_uids); no pickle."""
    arrays: dict[str, np.ndarray] = {
        "x": np.asarray(training_set.x, dtype=np.float32),
        "y": np.asarray(training_set.y, dtype=np.int64),
        "sop_instance_uids": np.asarray(training_set.sop_instance_uids, dtype=np.str_),
    }
    path.write_bytes(encode_tensors(arrays, compress=False))


def read_prepared_set(path: Path) -> TrainingSet:
    """The training set in ``path``; ValueError says what is wrong with the file."""
    try:
        arrays = decode_tensors(path.read_bytes())
    except (OSError, EncodingError) as exc:
        raise ValueError(f"cannot read the training set {path}: {exc}") from exc
    missing = sorted({"x", "y", "sop_instance_uids"} - set(arrays))
    if missing:
        raise ValueError(f"the training set {path} lacks {missing}")
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.float32 or y.dtype != np.int64:
        raise ValueError(f"the training set {path} needs x float32 and y int64, has {x.dtype} and {y.dtype}")
    uids = tuple(str(u) for u in arrays["sop_instance_uids"].reshape(-1))
    return TrainingSet(x=x, y=y, sop_instance_uids=uids)
