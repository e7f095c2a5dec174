"""Compact CNNs of the federated benchmark: the calibration's 93 k-parameter net and a wider private model."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

from hub.models.registry import DataConfig, register_model

Norm = Literal["batch", "group"]

#: The benchmark renders images to [0, 1] and normalises them as (x - 0.5) / 0.25 (docs/benchmarks.md).
FL_BENCH_28 = DataConfig(
    input_size=(1, 28, 28),
    mean=(0.5,),
    std=(0.25,),
    labels=("normal", "pneumonia"),
    interpolation="area",
    num_outputs=1,
)


def norm_layer(kind: Norm, channels: int) -> nn.Module:
    """BatchNorm (the calibration's choice) or GroupNorm (no running statistics to average)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; choose 'batch' or 'group'")


def conv_block(in_ch: int, out_ch: int, norm: Norm, stride: int) -> nn.Sequential:
    """3x3 conv (no bias: the norm adds one) → norm → ReLU; the norm is named ``norm`` so FedBN finds it."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            norm=norm_layer(norm, out_ch),
            act=nn.ReLU(inplace=True),
        )
    )


class FlCnnFeatures(nn.Sequential):
    """Strided conv blocks then global average pooling: (B, 1, 28, 28) → (B, widths[-1])."""

    def __init__(
        self, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128), norm: Norm = "batch", depth: int = 1
    ) -> None:
        layers: list[nn.Module] = []
        prev = in_chans
        for w in widths:
            layers.append(conv_block(prev, w, norm, stride=2))  # halves H and W: 28 → 14 → 7 → 4
            layers.extend(conv_block(w, w, norm, stride=1) for _ in range(depth - 1))
            prev = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(*layers)
        self.out_features = prev


class FlCnn(nn.Module):
    """Feature extractor + linear head; ``features`` and ``head`` are the shared/personal split points."""

    def __init__(
        self,
        in_chans: int = 1,
        num_outputs: int = 1,
        widths: tuple[int, ...] = (32, 64, 128),
        norm: Norm = "batch",
        depth: int = 1,
    ) -> None:
        super().__init__()
        self.features = FlCnnFeatures(in_chans, widths, norm, depth)
        self.head = nn.Linear(self.features.out_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 1, 28, 28) normalised image
        return self.head(self.features(x))  # (B, num_outputs) logits


@register_model(data_config=FL_BENCH_28)
def fl_cnn(in_chans: int = 1, num_outputs: int = 1, norm: Norm = "batch") -> FlCnn:
    """Calibration CNN: 3 × [3x3 conv stride 2 → norm → ReLU] (32/64/128), GAP, linear; 93 k params."""
    return FlCnn(in_chans=in_chans, num_outputs=num_outputs, norm=norm)
