"""Compact CNN students for 28x28 grey images: small enough for a clinic CPU, exported to the edge."""

from __future__ import annotations

import torch
from torch import nn

from hub.models.common import PNEUMONIA_28, ClassifierHead, ConvBNAct
from hub.models.registry import register_model


class StudentCNN(nn.Module):
    """Five conv-BN-ReLU layers (two stride-2 downsamples), global pooling, one linear head."""

    def __init__(
        self, in_chans: int = 1, num_outputs: int = 1, width: int = 16, dropout: float = 0.1
    ) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            ConvBNAct(in_chans, w),  # (B, w, 28, 28)
            ConvBNAct(w, 2 * w, stride=2),  # (B, 2w, 14, 14)
            ConvBNAct(2 * w, 2 * w),  # (B, 2w, 14, 14)
            ConvBNAct(2 * w, 4 * w, stride=2),  # (B, 4w, 7, 7)
            ConvBNAct(4 * w, 4 * w),  # (B, 4w, 7, 7)
        )
        self.head = ClassifierHead(4 * w, num_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) normalised grey image
        return self.head(self.features(x))  # (B, num_outputs) logits


@register_model(data_config=PNEUMONIA_28)
def student_cnn_s(
    in_chans: int = 1, num_outputs: int = 1, width: int = 16, dropout: float = 0.1
) -> StudentCNN:
    """Small student CNN (about 70 k parameters at width 16) for binary 28x28 grey images."""
    return StudentCNN(in_chans=in_chans, num_outputs=num_outputs, width=width, dropout=dropout)
