"""How many of each clinic's test images fall outside a model's input envelope (the bundle's check).

The envelope is fitted as the exporter fits it (``export.envelope.fit_envelope``) on the model's embeddings
of the pooled validation split of the clinics that trained: the images the model was checked on. Each
clinic's test images, the unseen clinic's and every panel profile's are then counted inside or outside,
so the share outside can be set beside the AUC there. No label is read: the count is what a node's drift
monitor sees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from edge_node.protocol.envelope import EnvelopeCheck
from export.envelope import DEFAULT_QUANTILE, fit_envelope
from harness.flbench.datasets import BenchData
from hub.models.fl_cnn import FlCnn

__all__ = ["Embedder", "envelope_rates", "feature_embedder"]

#: (N, 1, H, W) normalised images → (N, D) embeddings (the input of the model's final linear layer).
Embedder = Callable[[torch.Tensor], np.ndarray]


def feature_embedder(model: FlCnn, batch_size: int = 512) -> Embedder:
    """The CNN's features (what its head reads), in eval mode, as the exported embedding output."""

    def embed(x: torch.Tensor) -> np.ndarray:
        model.eval()
        with torch.inference_mode():
            parts = [model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(parts).numpy().astype(np.float64) if parts else np.zeros((0, model.head.in_features))

    return embed


def _count(check: EnvelopeCheck, embedding: np.ndarray) -> dict[str, int]:
    return {"outside": int(check.outside(embedding).sum()), "n": len(embedding)}


def envelope_rates(data: BenchData, embed: Embedder, quantile: float = DEFAULT_QUANTILE) -> dict[str, Any]:
    """Counts outside the envelope per trained clinic (its test split), the unseen clinic and the panel."""
    val_x, _ = data.pooled_val()
    check = EnvelopeCheck.of(fit_envelope(embed(val_x), quantile=quantile))
    out: dict[str, Any] = {
        "quantile": quantile,
        "clinics": {c: _count(check, embed(data.clinics[c].test_x)) for c in data.names},
        "unseen": _count(check, embed(data.unseen_x)),
    }
    if data.panel:
        out["panel"] = {n: _count(check, embed(x)) for n, x in data.panel.items()}
    return out
