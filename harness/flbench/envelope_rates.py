"""How many of each clinic's test images fall outside a model's input envelope (the bundle's check).

The envelope is fitted with the exporter's functions (``export.envelope.fit_envelope``) on the model's
embeddings of the pooled validation split of the clinics that trained: the images the model was checked on,
as a federated envelope would hold them. Each
clinic's test images, the unseen clinic's and every panel profile's are then counted inside or outside,
so the share outside can be set beside the AUC there. The envelope's intensity part is fitted on the same
images' grey values (``export.envelope.fit_intensity_envelope``; the bench's images are the model input in
[0, 1]). Per place: ``outside`` as a node counts it (outside either part), and apart ``embedding``,
``intensity`` and ``negative`` (outside the intensity part and looking like a negative). No label is read:
the counts are what a node's drift monitor sees.

``hub`` holds the same counts for the envelope fitted on the hub's own validation split (raw images, no
clinic's profile), which is what ``fedclinic-hub export`` ships today: the hub holds no clinic's images.
Its grey-value part is widened by the exporter's augmented copies; the pooled one is not (it already spans
the clinics' scanners, and copies on top of it take in inverted displays: docs/benchmarks.md, "The envelope
the product ships").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck
from export.envelope import DEFAULT_QUANTILE, INTENSITY_COPIES, fit_envelope, fit_intensity_envelope
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


def _count(
    check: EnvelopeCheck, grey_check: IntensityCheck, embed: Embedder, x: torch.Tensor
) -> dict[str, int]:
    embedding = check.outside(embed(x))
    seen = grey_check.judge(x[:, 0].numpy())
    return {
        "outside": int((embedding | seen.outside).sum()),
        "n": len(x),
        "embedding": int(embedding.sum()),
        "intensity": int(seen.outside.sum()),
        "negative": int(seen.negative.sum()),
    }


def envelope_rates(data: BenchData, embed: Embedder, quantile: float = DEFAULT_QUANTILE) -> dict[str, Any]:
    """Counts outside the envelope per trained clinic (its test split), the unseen clinic and the panel."""
    val_x, _ = data.pooled_val()
    out: dict[str, Any] = {"quantile": quantile, **_places(data, embed, val_x, quantile, copies=0)}
    if data.hub_val_x is not None:
        # The envelope the product ships today: fitted on the hub's own (raw) validation split.
        out["hub"] = _places(data, embed, data.hub_val_x, quantile, copies=INTENSITY_COPIES)
    return out


def _places(
    data: BenchData, embed: Embedder, fit_x: torch.Tensor, quantile: float, *, copies: int
) -> dict[str, Any]:
    """Counts per place for the envelope fitted on ``fit_x`` (both parts; ``copies`` augmented copies of
    each image in the grey-value part)."""
    check = EnvelopeCheck.of(fit_envelope(embed(fit_x), quantile=quantile))
    grey = fit_intensity_envelope(fit_x[:, 0].numpy(), quantile=quantile, copies=copies)
    grey_check = IntensityCheck.of(grey)

    def count(x: torch.Tensor) -> dict[str, int]:
        return _count(check, grey_check, embed, x)

    out: dict[str, Any] = {
        "clinics": {c: count(data.clinics[c].test_x) for c in data.names},
        "unseen": count(data.unseen_x),
    }
    if data.panel:
        out["panel"] = {n: count(x) for n, x in data.panel.items()}
    return out
