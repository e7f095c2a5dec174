"""Ditto (Li, Hu, Beirami, Smith, 2021), the personalisation baseline built for the worst client.

Every clinic takes part in plain FedAvg and, beside the model it trains for the federation, keeps a personal
model of its own. Each round, after receiving the global model w, the clinic first trains its personal model v
on its own images with the proximal pull λ/2 ‖v − w‖² toward w, then trains w as any FedAvg clinic does and
sends that update. The clinic predicts with v. λ = 0 gives each clinic its own local model, which never
learns from anyone; a large λ holds v at w.

The personal steps are the paper's: plain SGD, v ← v − η (∇F(v) + λ (v − w)). Not Adam, whose steps are about
η whatever the gradient: a small clinic takes one or two steps a round, and under Adam its personal model
could not follow w however large λ (on pneumonia's design seeds, at λ = 10 and 100, it stayed 0.011 below
FedAvg's global model at the small clinics and 0.018–0.019 at the worst). With SGD and ηλ = 1 a step lands
on w less η times the gradient on the clinic's own images.

The personal model draws its minibatches and augmentations from a generator of its own, so the federation's
side is bit for bit the FedAvg run with the same seed: the paired difference against it is the personal
model's worth alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from hub.fl.strategy import ClientResult, ClientTask, Params
from hub.training.datasets import ClinicData
from hub.training.learners import (
    LocalConfig,
    SupervisedLearner,
    load_params,
    proximal_anchor,
    to_params,
    train_local,
)

__all__ = ["PERSONAL_PREFIX", "DittoLearner"]

#: How the personal model's tensors and generator are named in a clinic's saved state.
PERSONAL_PREFIX = "ditto_personal/"
_PERSONAL_RNG = PERSONAL_PREFIX + "__rng__"

#: Offset of the personal model's generator seed from the federation side's.
_PERSONAL_SEED_OFFSET = 7_919


class DittoLearner(SupervisedLearner):
    """A FedAvg clinic that also trains and predicts with a personal model pulled toward the global one."""

    def __init__(
        self,
        client_id: str,
        model: nn.Module,
        personal: nn.Module,
        data: ClinicData,
        default: LocalConfig,
        seed: int,
        lam: float,
        lr: float,
    ) -> None:
        if lam < 0 or lr <= 0:
            raise ValueError(f"Ditto's λ must be ≥ 0 and its step η > 0, not λ = {lam}, η = {lr}")
        super().__init__(client_id, model, data, default, seed)
        self.personal = personal
        self.lam = lam
        self.lr = lr
        self.personal_gen = torch.Generator().manual_seed(seed + _PERSONAL_SEED_OFFSET)

    def fit(self, task: ClientTask) -> ClientResult:
        cfg = LocalConfig.from_task(task.config, self.default)
        train_local(
            self.personal,
            self.data.train_x,
            self.data.train_y,
            replace(cfg, mu=self.lam),
            self.personal_gen,
            prox_anchor=proximal_anchor(task.params),
            optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=self.lr),
        )
        return super().fit(task)

    def state(self) -> Params:
        own = {PERSONAL_PREFIX + k: v for k, v in to_params(self.personal).items()}
        return {**super().state(), **own, _PERSONAL_RNG: self.personal_gen.get_state().numpy().copy()}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        super().restore({k: v for k, v in state.items() if not k.startswith(PERSONAL_PREFIX)})
        own = {k[len(PERSONAL_PREFIX) :]: v for k, v in state.items() if k.startswith(PERSONAL_PREFIX)}
        self.personal_gen.set_state(torch.from_numpy(np.array(own.pop("__rng__"))))
        load_params(self.personal, own)
