"""FedHelp's small shared model (extractor + private head + public head) and the large private model."""

from __future__ import annotations

import torch
from torch import nn

from hub.models.fl_cnn import FL_BENCH_28, FlCnn, FlCnnFeatures, Norm
from hub.models.registry import register_model


class FedHelpSmall(nn.Module):
    """The small shared architecture: extractor φ, private head (1 logit, or one per class), public head
    (public classes).

    ``forward`` is the private (primary-task) path, so the model deploys as a plain single-input classifier.
    """

    def __init__(self, norm: Norm = "group", public_classes: int = 2, num_outputs: int = 1) -> None:
        super().__init__()
        self.features = FlCnnFeatures(1, (32, 64, 128), norm)
        self.private_head = nn.Linear(self.features.out_features, num_outputs)
        self.public_head = nn.Linear(self.features.out_features, public_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.private_head(self.features(x))  # (B, num_outputs)

    def forward_public(self, x: torch.Tensor) -> torch.Tensor:
        return self.public_head(self.features(x))  # (B, public_classes)


@register_model(data_config=FL_BENCH_28)
def fedhelp_small(norm: Norm = "group", public_classes: int = 2, num_outputs: int = 1) -> FedHelpSmall:
    """FedHelp surrogate/proxy: the 93 k-parameter compact CNN with a private and a public head."""
    return FedHelpSmall(norm=norm, public_classes=public_classes, num_outputs=num_outputs)


@register_model(data_config=FL_BENCH_28)
def fedhelp_large(norm: Norm = "group", num_outputs: int = 1) -> FlCnn:
    """FedHelp large client's private model: the wider CNN (48/96/192; about 209 k parameters)."""
    return FlCnn(widths=(48, 96, 192), norm=norm, num_outputs=num_outputs)


@register_model(data_config=FL_BENCH_28)
def foundation_cnn(norm: Norm = "group", num_outputs: int = 2, depth: int = 2) -> FlCnn:
    """The hub's own "foundation model": a wider CNN (48/96/192, ``depth`` convs per stage), trained once."""
    return FlCnn(widths=(48, 96, 192), norm=norm, depth=depth, num_outputs=num_outputs)
