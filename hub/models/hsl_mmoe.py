"""HSL's two-branch multi-gate mixture-of-experts network (docs/algorithms.md §1.3), compact CNN encoders."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from hub.models.fl_cnn import FL_BENCH_28, FlCnnFeatures, Norm
from hub.models.registry import register_model

PRIMARY, ANCHOR = 0, 1

#: How the two encoders' outputs are fused before the experts and gates. "softmax": the paper's softmax over
#: the concatenated dims at temperature T; "concat": the concatenation itself. With 2E = 128 dims the
#: softmax makes every fused value ≈ 1/128, so experts and gates see an almost constant input.
Fusion = Literal["softmax", "concat"]


class Encoder(nn.Module):
    """Compact CNN features → Linear → ReLU: (B, 1, 28, 28) → (B, embed)."""

    def __init__(self, widths: tuple[int, ...], norm: Norm, embed: int) -> None:
        super().__init__()
        self.cnn = FlCnnFeatures(1, widths, norm)
        self.proj = nn.Sequential(nn.Linear(self.cnn.out_features, embed), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.cnn(x))


class HslMmoe(nn.Module):
    """Branch A (primary image) and branch B (shared-anchor image), MMoE with one gate and tower per task.

    Fusion: concat(hA, hB), then (``fusion="softmax"``, as in HSL) a softmax over its dims at temperature T.
    Each task's feature is
    its gate's mixture of the experts plus a residual linear map of that task's own encoder output. Forward
    returns logits (B, K + 1): columns 0..K−1 the primary task (K = ``primary_outputs``: 1 sigmoid logit for
    a binary task, one per class otherwise), column K the (binary) anchor task.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        norm: Norm = "group",
        embed: int = 64,
        n_experts: int = 6,
        expert_hidden: int = 32,
        expert_out: int = 32,
        tower_hidden: int = 16,
        temperature: float = 3.0,
        dropout: float = 0.2,
        fusion: Fusion = "softmax",
        primary_outputs: int = 1,
    ) -> None:
        super().__init__()
        if fusion not in ("softmax", "concat"):
            raise ValueError(f"unknown HSL fusion {fusion!r}; choose 'softmax' or 'concat'")
        self.temperature = temperature
        self.fusion = fusion
        self.primary_outputs = primary_outputs
        self.encoders = nn.ModuleList([Encoder(widths, norm, embed) for _ in (PRIMARY, ANCHOR)])
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(2 * embed, expert_hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                # No ReLU on the expert output: with a small tower, all-ReLU paths could die (a seed collapsed
                # to a constant output with 16→8 towers).
                nn.Linear(expert_hidden, expert_out),
            )
            for _ in range(n_experts)
        )
        self.gates = nn.ModuleList(nn.Linear(2 * embed, n_experts) for _ in (PRIMARY, ANCHOR))
        self.residuals = nn.ModuleList(nn.Linear(embed, expert_out) for _ in (PRIMARY, ANCHOR))
        self.towers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(expert_out, tower_hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(tower_hidden, primary_outputs if task == PRIMARY else 1),
            )
            for task in (PRIMARY, ANCHOR)
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x_primary: torch.Tensor, x_anchor: torch.Tensor) -> torch.Tensor:
        h = [self.encoders[PRIMARY](x_primary), self.encoders[ANCHOR](x_anchor)]  # 2 × (B, E)
        fused = torch.cat(h, dim=1)  # (B, 2E)
        if self.fusion == "softmax":
            fused = torch.softmax(fused / self.temperature, dim=1)
        experts = torch.stack([e(fused) for e in self.experts], dim=1)  # (B, K, D)
        logits = []
        for task in (PRIMARY, ANCHOR):
            gate = torch.softmax(self.gates[task](fused), dim=1)  # (B, K)
            feat = torch.einsum("bk,bkd->bd", gate, experts) + self.residuals[task](h[task])  # (B, D)
            logits.append(self.towers[task](feat))  # (B, K) primary, (B, 1) anchor
        return torch.cat(logits, dim=1)  # (B, K + 1)

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward's output as (primary logits (B, K), anchor logit (B,))."""
        return logits[:, : self.primary_outputs], logits[:, self.primary_outputs]


class AnchoredHsl(nn.Module):
    """Deployment form: one input; branch B always sees a fixed, frozen anchor image (a buffer).

    The anchor is stored normalised, (1, 1, 28, 28). Output: the primary-task logits (B, K).
    """

    def __init__(self, net: HslMmoe, anchor: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("anchor", anchor.reshape(1, *anchor.shape[-3:]).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        anchor: torch.Tensor = self.anchor  # type: ignore[assignment]
        return self.net.split(self.net(x, anchor.expand(x.shape[0], -1, -1, -1)))[0]


@register_model(data_config=FL_BENCH_28)
def hsl_mmoe(
    norm: Norm = "group",
    n_experts: int = 6,
    embed: int = 64,
    fusion: Fusion = "softmax",
    num_outputs: int = 1,
) -> HslMmoe:
    """HSL two-branch MMoE (2 compact CNN encoders, 6 experts, a gate and tower per task); ``num_outputs``
    primary logits."""
    return HslMmoe(norm=norm, n_experts=n_experts, embed=embed, fusion=fusion, primary_outputs=num_outputs)
