"""The tensors of the 70k-parameter student (``student_cnn_s``): names, shapes and dtypes of its state."""

from __future__ import annotations

import numpy as np

_CONVS = [(16, 1), (32, 16), (32, 32), (64, 32), (64, 64)]


def student_arrays() -> list[np.ndarray]:
    """Zero tensors in the student's state-dict order (5 conv + batch-norm blocks, then a 64 → 1 head)."""
    out: list[np.ndarray] = []
    for c_out, c_in in _CONVS:
        out.append(np.zeros((c_out, c_in, 3, 3), dtype=np.float32))  # conv weight
        out += [np.zeros(c_out, dtype=np.float32) for _ in range(4)]  # BN weight, bias, running mean, var
        out.append(np.zeros((), dtype=np.int64))  # BN num_batches_tracked
    out += [np.zeros((1, 64), dtype=np.float32), np.zeros(1, dtype=np.float32)]  # head
    return out
