"""Larger residual CNN teachers for 28x28 grey images (hub-side only; distilled into students)."""

from __future__ import annotations

import torch
from torch import nn

from hub.models.common import PNEUMONIA_28, ClassifierHead, ConvBNAct
from hub.models.registry import register_model


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity (or 1x1 projection) shortcut, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_ch, out_ch, stride=stride)
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class TeacherResNet(nn.Module):
    """A small ResNet for 28x28 inputs: stem, three stages of two basic blocks, pooling, linear head."""

    def __init__(
        self,
        in_chans: int = 1,
        num_outputs: int = 1,
        widths: tuple[int, int, int] = (64, 128, 256),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = ConvBNAct(in_chans, w1)  # (B, w1, 28, 28)
        self.stages = nn.Sequential(
            BasicBlock(w1, w1),
            BasicBlock(w1, w1),  # (B, w1, 28, 28)
            BasicBlock(w1, w2, stride=2),
            BasicBlock(w2, w2),  # (B, w2, 14, 14)
            BasicBlock(w2, w3, stride=2),
            BasicBlock(w3, w3),  # (B, w3, 7, 7)
        )
        self.head = ClassifierHead(w3, num_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) normalised grey image
        return self.head(self.stages(self.stem(x)))  # (B, num_outputs) logits


@register_model(data_config=PNEUMONIA_28)
def teacher_cnn_l(
    in_chans: int = 1,
    num_outputs: int = 1,
    widths: tuple[int, int, int] = (64, 128, 256),
    dropout: float = 0.2,
) -> TeacherResNet:
    """Residual teacher CNN (about 2.8 M parameters) for binary 28x28 grey images."""
    return TeacherResNet(in_chans=in_chans, num_outputs=num_outputs, widths=widths, dropout=dropout)
