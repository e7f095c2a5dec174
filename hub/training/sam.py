"""Sharpness-aware minimisation (SAM): the gradient taken at the nearby weights where the loss is highest.

One step: the loss's gradient g at the weights w; the weights moved to w + ρ·g/‖g‖ (to first order, the
point of the ρ-ball around w where the loss is highest); the loss's gradient taken again there; the weights
moved back to w; the optimiser steps with that second gradient. A model trained so sits in a flatter
region of the loss, which the federated version of the method (each clinic training with SAM, the hub
averaging as before) sets against the clinics' different data. Each step costs two forward and backward
passes, and nothing more on the wire.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["sharpness_aware_backward"]


def sharpness_aware_backward(model: nn.Module, loss_fn: Callable[[], torch.Tensor], rho: float) -> float:
    """Leave in ``model``'s ``.grad`` the gradient of ``loss_fn`` at the ρ-perturbed weights; returns the
    loss at the unperturbed weights.

    ``loss_fn`` must compute the same batch's loss each time it is called (its inputs drawn beforehand).
    The weights are as they were when this returns; the caller steps its optimiser. A gradient of norm 0
    (nothing to perturb toward) or not finite is left as the plain gradient.
    """
    if rho <= 0:
        raise ValueError(f"SAM's radius must be above 0, got {rho}")
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    if not torch.isfinite(norm) or float(norm) == 0.0:
        return float(loss.detach())
    scale = rho / norm
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            assert p.grad is not None
            p.add_(p.grad * scale)
    model.zero_grad(set_to_none=True)
    try:
        loss_fn().backward()
    finally:
        with torch.no_grad():  # the weights exactly as they were (w + m − m may differ in the last bit)
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
    return float(loss.detach())
