"""Optimiser steps: the method's own, and shared one-time work counted apart."""

from __future__ import annotations

import torch

from harness.flbench.steps import StepCounter, one_time_work


def _step(opt: torch.optim.Optimizer, w: torch.Tensor) -> None:
    opt.zero_grad()
    (w**2).sum().backward()
    opt.step()


def test_steps_inside_one_time_work_are_counted_apart() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=0.1)
    with StepCounter().counting() as counter:
        _step(opt, w)
        with one_time_work():
            for _ in range(3):
                _step(opt, w)
        _step(opt, w)
    assert (counter.steps, counter.one_time_steps) == (2, 3)
    _step(opt, w)  # the hook is gone once counting ends
    assert counter.steps == 2
