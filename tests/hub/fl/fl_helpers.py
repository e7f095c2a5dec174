"""Helpers for the hub.fl tests: client results shaped like their task."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hub.fl.strategy import ClientResult, ClientTask, Params


def make_result(
    task: ClientTask,
    delta: Mapping[str, list[float] | float | np.ndarray],
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
) -> ClientResult:
    """A result whose update has each task tensor's dtype and shape (values from ``delta``)."""
    update: Params = {
        name: np.asarray(delta[name], dtype=task.params[name].dtype).reshape(task.params[name].shape)
        for name in delta
    }
    return ClientResult(task.client_id, task.round, num_examples, update, dict(metrics or {}))
