"""AdaBN: a model's BatchNorm statistics re-estimated on a new clinic's unlabeled images.

A model trained elsewhere meets a new clinic's scanner with the training clinics' normalisation statistics.
The clinic has images before it has labels, so it can re-estimate those statistics on its own images and
keep every learned weight (AdaBN; what it does on the bench's panels: docs/benchmarks.md, "AdaBN").
GroupNorm models have no statistics to re-estimate; they come back unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hub.training.learners import normalize

__all__ = ["adapt_norms"]


def adapt_norms(model: nn.Module, images01: torch.Tensor, *, batch: int = 512) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are those of ``images01`` (N, 1, H, W) in
    [0, 1], averaged over batches of ``batch``; its weights, and ``model`` itself, are unchanged."""
    if len(images01) == 0:
        raise ValueError("adapting normalisation statistics needs at least one image")
    adapted = copy.deepcopy(model).eval()
    norms = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
        m.train()
    with torch.no_grad():
        for i in range(0, len(images01), batch):
            adapted(normalize(images01[i : i + batch]))
    return adapted.eval()
