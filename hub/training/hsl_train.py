"""HSL's local step (docs/algorithms.md §1.4) and its single-input deployment with a frozen anchor (§1.6)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hub.fl.strategy import ClientResult, ClientTask, Params
from hub.models.hsl_mmoe import AnchoredHsl, HslMmoe
from hub.training.datasets import ClinicData
from hub.training.learners import (
    AUGMENT,
    LocalConfig,
    load_params,
    local_result,
    normalize,
    primary_logits,
    task_loss,
    to_params,
)


def padded_order(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """A shuffled pass over ``n`` items, topped up to ``length`` by uniform resampling (HSL's pairing)."""
    order = torch.randperm(n, generator=gen)
    if length > n:
        order = torch.cat([order, torch.randint(0, n, (length - n,), generator=gen)])
    return order[torch.randperm(length, generator=gen)]


def balance_primary(idx: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Replace majority-class picks by random minority items with probability (0.5 − p_min)/p_max.

    p are the clinic's class proportions; the expected class mix of the result is 50/50 (§1.4). With more
    than two classes, every pick is replaced by a random item of a uniformly drawn class present at the
    clinic: the expected mix is again uniform over its classes.
    """
    present = torch.unique(labels)
    if len(present) > 2 or (len(present) > 0 and float(present.max()) > 1):
        cls = present[torch.randint(0, len(present), (len(idx),), generator=gen)]  # (n,)
        picks = torch.empty_like(idx)
        for c in present:
            pool = torch.nonzero(labels == c).reshape(-1)
            mine = cls == c
            picks[mine] = pool[torch.randint(0, len(pool), (int(mine.sum()),), generator=gen)]
        return picks
    p_pos = float(labels.mean())
    if p_pos in (0.0, 1.0) or math.isclose(p_pos, 0.5):
        return idx
    minority = 1.0 if p_pos < 0.5 else 0.0
    p_min, p_max = min(p_pos, 1 - p_pos), max(p_pos, 1 - p_pos)
    minority_idx = torch.nonzero(labels == minority).reshape(-1)
    is_major = labels[idx] != minority
    swap = is_major & (torch.rand(len(idx), generator=gen) < (0.5 - p_min) / p_max)
    picks = minority_idx[torch.randint(0, len(minority_idx), (len(idx),), generator=gen)]
    return torch.where(swap, picks, idx)


class HslLearner:
    """A clinic training HSL's two-task MMoE on (primary image, shared-anchor image) pairs."""

    def __init__(
        self,
        client_id: str,
        model: HslMmoe,
        data: ClinicData,
        anchor_x: torch.Tensor,
        anchor_y: torch.Tensor,
        default: LocalConfig,
        seed: int,
    ) -> None:
        self.client_id = client_id
        self.model = model
        self.data = data
        self.anchor_x = anchor_x
        self.anchor_y = anchor_y
        self.default = default
        self.gen = torch.Generator().manual_seed(seed)

    def fit(self, task: ClientTask) -> ClientResult:
        cfg = LocalConfig.from_task(task.config, self.default)
        w_primary = float(task.config.get("primary_weight", 0.5))
        w_anchor = float(task.config.get("sat_weight", 0.5))
        load_params(self.model, task.params)
        # Dropout draws from torch's global RNG: seed it from this clinic's generator (which round checkpoints
        # save), so a resumed run replays exactly.
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.gen)))
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model.train()
        n_p, n_a = self.data.n_train, len(self.anchor_y)
        length = max(n_p, n_a)  # epoch length: the longer set; the shorter is resampled
        losses: list[float] = []
        for _ in range(cfg.epochs):
            p_idx = balance_primary(padded_order(n_p, length, self.gen), self.data.train_y, self.gen)
            a_idx = padded_order(n_a, length, self.gen)
            for start in range(0, length, cfg.batch_size):
                pi, ai = p_idx[start : start + cfg.batch_size], a_idx[start : start + cfg.batch_size]
                xp = self.data.train_x[pi]  # (b, 1, H, W) primary images of this clinic's profile
                if cfg.augment:
                    xp = AUGMENT(xp, self.gen)
                logits = self.model(normalize(xp), normalize(self.anchor_x[ai]))  # (b, K + 1)
                primary, anchor = self.model.split(logits)
                loss = w_primary * task_loss(primary_logits(primary), self.data.train_y[pi]) + (
                    w_anchor * F.binary_cross_entropy_with_logits(anchor, self.anchor_y[ai])
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        return local_result(self.client_id, task, self.model, n_p, losses)

    def state(self) -> Params:
        return {**to_params(self.model), "__rng__": self.gen.get_state().numpy().copy()}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        load_params(self.model, {k: v for k, v in state.items() if k != "__rng__"})
        self.gen.set_state(torch.from_numpy(np.array(state["__rng__"])))


class HslStepsLearner:
    """HSL's training loop without the anchor task, for any single-input model: the ablation that shows
    what HSL's sampling does on its own.

    Per epoch, ``max(n, steps_like)`` primary items (``steps_like`` = the anchor set's size, so a small
    clinic takes as many steps as under HSL), class-balanced as in HSL, AdamW.
    """

    def __init__(
        self,
        client_id: str,
        model: nn.Module,
        data: ClinicData,
        steps_like: int,
        default: LocalConfig,
        seed: int,
    ) -> None:
        self.client_id = client_id
        self.model = model
        self.data = data
        self.steps_like = steps_like
        self.default = default
        self.gen = torch.Generator().manual_seed(seed)

    def fit(self, task: ClientTask) -> ClientResult:
        cfg = LocalConfig.from_task(task.config, self.default)
        load_params(self.model, task.params)
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model.train()
        n = self.data.n_train
        length = max(n, self.steps_like)
        losses: list[float] = []
        for _ in range(cfg.epochs):
            idx = balance_primary(padded_order(n, length, self.gen), self.data.train_y, self.gen)
            for start in range(0, length, cfg.batch_size):
                bi = idx[start : start + cfg.batch_size]
                xb = self.data.train_x[bi]  # (b, 1, H, W)
                if cfg.augment:
                    xb = AUGMENT(xb, self.gen)
                loss = task_loss(primary_logits(self.model(normalize(xb))), self.data.train_y[bi])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        return local_result(self.client_id, task, self.model, n, losses)

    def state(self) -> Params:
        return {**to_params(self.model), "__rng__": self.gen.get_state().numpy().copy()}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        load_params(self.model, {k: v for k, v in state.items() if k != "__rng__"})
        self.gen.set_state(torch.from_numpy(np.array(state["__rng__"])))


def anchor_choices(
    anchor_x: torch.Tensor, anchor_y: torch.Tensor, n_single: int = 5
) -> dict[str, torch.Tensor]:
    """Candidate fixed inputs for branch B, as rendered images (1, 1, H, W) in [0, 1].

    "mean" (the deployment choice): the pixel mean of the anchor set every node holds: deterministic, tied to
    no single image or class, and the centre of what branch B saw in training. The others are single anchor
    images of both classes (fixed picks), to measure how much the choice matters.
    """
    choices = {"mean": anchor_x.mean(dim=0, keepdim=True)}
    for cls in (0, 1):
        idx = torch.nonzero(anchor_y == cls).reshape(-1)
        for k in range(min(len(idx), math.ceil(n_single / 2))):
            pick = int(idx[(k * 7919) % len(idx)])  # spread over the set, reproducibly
            choices[f"img{pick}_y{cls}"] = anchor_x[pick : pick + 1]
    return choices


def anchored(model: HslMmoe, anchor01: torch.Tensor) -> AnchoredHsl:
    """The single-input deployment model with this anchor frozen into branch B."""
    return AnchoredHsl(model, normalize(anchor01)).eval()


@torch.inference_mode()
def predict_self_paired(model: HslMmoe, x01: torch.Tensor) -> np.ndarray:
    """Demo.py's inference: the test image fed to both branches (reported for comparison only)."""
    model.eval()
    out = [
        primary_logits(model.split(model(normalize(x01[i : i + 512]), normalize(x01[i : i + 512])))[0])
        for i in range(0, len(x01), 512)
    ]
    return torch.cat(out).numpy().astype(np.float64)
