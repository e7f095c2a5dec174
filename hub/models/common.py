"""Building blocks and data configs shared by the model families."""

from __future__ import annotations

import torch
from torch import nn

from hub.models.registry import DataConfig

#: Mean and std of x/255 over the PneumoniaMNIST train split (4,708 images), like timm's ImageNet means.
PNEUMONIA_MEAN = (0.5719,)
PNEUMONIA_STD = (0.1684,)

PNEUMONIA_28 = DataConfig(
    input_size=(1, 28, 28),
    mean=PNEUMONIA_MEAN,
    std=PNEUMONIA_STD,
    labels=("normal", "pneumonia"),
    interpolation="area",
    num_outputs=1,
)


class ConvBNAct(nn.Sequential):
    """3x3 (or kxk) convolution -> BatchNorm -> ReLU; the conv has no bias because BatchNorm adds one."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> linear to ``num_outputs`` logits."""

    def __init__(self, in_ch: int, num_outputs: int, dropout: float) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x).flatten(1)  # (B, C)
        return self.fc(self.drop(x))  # (B, num_outputs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
