"""Optimiser steps as spent: every torch optimiser's steps, counted by a global post-step hook, so that each
method's budget is reported whatever its training loop does. Work the hub does once and shares between runs
(FedHelp's foundation teacher, cached per out dir) is counted apart, inside ``one_time_work()``, so that the
seed that happens to train it is not charged for every seed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_one_time_depth = 0


@contextmanager
def one_time_work() -> Iterator[None]:
    """Steps taken inside count as one-time work, not as the running method's budget."""
    global _one_time_depth
    _one_time_depth += 1
    try:
        yield
    finally:
        _one_time_depth -= 1


class StepCounter:
    """Counts optimiser steps while active: ``steps`` for the method's own training, ``one_time_steps`` for
    shared one-time work."""

    def __init__(self) -> None:
        self.steps = 0
        self.one_time_steps = 0

    @contextmanager
    def counting(self) -> Iterator[StepCounter]:
        def hook(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            if _one_time_depth:
                self.one_time_steps += 1
            else:
                self.steps += 1

        handle = register_optimizer_step_post_hook(hook)
        try:
            yield self
        finally:
            handle.remove()
