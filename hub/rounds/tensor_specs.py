"""The tensors a task expects back, as stored with the task (JSON rows) and as checkable TensorSpecs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hub.fl.validation import TensorSpec

__all__ = ["expected_json", "expected_specs"]


def expected_json(expected: dict[str, TensorSpec]) -> list[dict[str, Any]]:
    return [
        {"name": n, "shape": list(s.shape), "dtype": s.dtype.str.lstrip("<>|=")} for n, s in expected.items()
    ]


def expected_specs(rows: Sequence[dict[str, Any]]) -> dict[str, TensorSpec]:
    return {r["name"]: TensorSpec(tuple(r["shape"]), np.dtype(r["dtype"])) for r in rows}
