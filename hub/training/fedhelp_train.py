"""FedHelp's clinic learners: small (surrogate + public-head KD) and large (dual KD with a proxy)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from hub.fl.strategy import ClientResult, ClientTask, Params
from hub.models.fedhelp_nets import FedHelpSmall
from hub.models.registry import create_model
from hub.training.datasets import ClinicData
from hub.training.fedhelp_kd import RankSign, kl_to_soft_labels, large_loss, proxy_loss
from hub.training.learners import (
    AUGMENT,
    LocalConfig,
    load_params,
    local_result,
    minibatches,
    normalize,
    predict,
    primary_logits,
    task_loss,
    to_params,
)


def _rng_state(gen: torch.Generator) -> np.ndarray:
    return gen.get_state().numpy().copy()


class FedHelpSmallLearner:
    """Small clinic: per private minibatch, (A) CE on private data, then (B) ``fm_weight``·KL toward the
    foundation soft labels on one public minibatch through the public head (docs/algorithms.md §2.3).
    Uploads φ + private head. ``fm_weight`` 0 (or the task's ``fm_weight``) skips step B: the ablation
    without the foundation head."""

    def __init__(
        self,
        client_id: str,
        model: FedHelpSmall,
        data: ClinicData,
        public_x: torch.Tensor,
        soft_labels: torch.Tensor,
        default: LocalConfig,
        seed: int,
        *,
        fm_weight: float = 1.0,
    ) -> None:
        self.client_id = client_id
        self.model = model
        self.data = data
        self.fm_weight = fm_weight
        self.public_x = public_x
        self.soft_labels = soft_labels
        self.default = default
        self.gen = torch.Generator().manual_seed(seed)
        self._public_order = torch.randperm(len(public_x), generator=self.gen)
        self._public_pos = 0

    def _public_batch(self, size: int) -> torch.Tensor:
        if self._public_pos + size > len(self._public_order):
            self._public_order = torch.randperm(len(self.public_x), generator=self.gen)
            self._public_pos = 0
        idx = self._public_order[self._public_pos : self._public_pos + size]
        self._public_pos += size
        return idx

    def fit(self, task: ClientTask) -> ClientResult:
        cfg = LocalConfig.from_task(task.config, self.default)
        fm_weight = float(task.config.get("fm_weight", self.fm_weight))
        load_params(self.model, task.params)
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model.train()
        losses: list[float] = []
        for _ in range(cfg.epochs):
            for idx in minibatches(self.data.n_train, cfg.batch_size, self.gen):
                xb = self.data.train_x[idx]
                if cfg.augment:
                    xb = AUGMENT(xb, self.gen)
                loss_a = task_loss(primary_logits(self.model(normalize(xb))), self.data.train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss_a.backward()
                opt.step()
                if fm_weight <= 0.0:
                    losses.append(float(loss_a.detach()))
                    continue
                pidx = self._public_batch(min(cfg.batch_size, len(self.public_x)))
                loss_b = fm_weight * kl_to_soft_labels(
                    self.soft_labels[pidx], self.model.forward_public(normalize(self.public_x[pidx]))
                )
                opt.zero_grad(set_to_none=True)
                loss_b.backward()
                opt.step()
                losses.append(float(loss_a.detach()) + float(loss_b.detach()))
        return local_result(self.client_id, task, self.model, self.data.n_train, losses)

    def predict(self, x01: torch.Tensor) -> np.ndarray:
        return predict(self.model, x01)

    def state(self) -> Params:
        return {
            **to_params(self.model),
            "__rng__": _rng_state(self.gen),
            "__public_order__": self._public_order.numpy().copy(),
            "__public_pos__": np.array(self._public_pos),
        }

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        load_params(self.model, {k: v for k, v in state.items() if not k.startswith("__")})
        self.gen.set_state(torch.from_numpy(np.array(state["__rng__"])))
        self._public_order = torch.from_numpy(np.array(state["__public_order__"]))
        self._public_pos = int(state["__public_pos__"])


class FedHelpLargeLearner:
    """Large hospital: a private large model and the small proxy, trained by asymmetric dual KD (§2.4).

    Per minibatch: (1) large model frozen, the proxy learns CE + kd_weight·KL(L ‖ P); (2) proxy frozen, the
    large model
    learns CE + kl_weight·KL(P ‖ L) + rank_weight·ranking hinge. Only the proxy (φ + private head) is
    uploaded; the large model never leaves and is what this hospital evaluates with.
    """

    def __init__(
        self,
        client_id: str,
        proxy: FedHelpSmall,
        large: nn.Module,
        data: ClinicData,
        default: LocalConfig,
        seed: int,
        *,
        kl_weight: float = 0.1,
        kd_weight: float = 1.0,
        rank_sign: RankSign = "agree",
    ) -> None:
        self.client_id = client_id
        self.model = proxy
        self.large = large
        self.data = data
        self.default = default
        self.kl_weight = kl_weight
        self.kd_weight = kd_weight
        self.rank_sign: RankSign = rank_sign
        self.gen = torch.Generator().manual_seed(seed)

    def fit(self, task: ClientTask) -> ClientResult:
        cfg = LocalConfig.from_task(task.config, self.default)
        rank_weight = float(task.config.get("rank_weight", 0.2))
        margin = float(task.config.get("rank_margin", 0.0))
        load_params(self.model, task.params)
        opt_p = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt_l = torch.optim.Adam(self.large.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model.train()
        self.large.train()
        losses: list[float] = []
        for _ in range(cfg.epochs):
            for idx in minibatches(self.data.n_train, cfg.batch_size, self.gen):
                xb = self.data.train_x[idx]
                if cfg.augment:
                    xb = AUGMENT(xb, self.gen)
                x, y = normalize(xb), self.data.train_y[idx]
                with torch.no_grad():
                    z_large = primary_logits(self.large(x))
                loss_p = proxy_loss(primary_logits(self.model(x)), z_large, y, kd_weight=self.kd_weight)
                opt_p.zero_grad(set_to_none=True)
                loss_p.backward()
                opt_p.step()
                with torch.no_grad():
                    z_proxy = primary_logits(self.model(x))
                loss_l = large_loss(
                    primary_logits(self.large(x)), z_proxy, y, kl_weight=self.kl_weight,
                    rank_weight=rank_weight, margin=margin, sign=self.rank_sign,
                )  # fmt: skip
                opt_l.zero_grad(set_to_none=True)
                loss_l.backward()
                opt_l.step()
                losses.append(float(loss_p.detach()))
        return local_result(self.client_id, task, self.model, self.data.n_train, losses)

    def predict(self, x01: torch.Tensor) -> np.ndarray:
        return predict(self.large, x01)

    def state(self) -> Params:
        large = {f"large.{k}": v for k, v in to_params(self.large).items()}
        return {**to_params(self.model), **large, "__rng__": _rng_state(self.gen)}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        load_params(
            self.model, {k: v for k, v in state.items() if k != "__rng__" and not k.startswith("large.")}
        )
        load_params(self.large, {k[len("large.") :]: v for k, v in state.items() if k.startswith("large.")})
        self.gen.set_state(torch.from_numpy(np.array(state["__rng__"])))


def _outputs(small: FedHelpSmall) -> dict[str, int]:
    # Binary models keep the registry's default signature; a K-class one asks for K outputs.
    k = small.private_head.out_features
    return {} if k == 1 else {"num_outputs": k}


def fedhelp_learner(
    role: str,
    client_id: str,
    small: FedHelpSmall,
    data: ClinicData,
    default: LocalConfig,
    seed: int,
    *,
    large_model: str = "fedhelp_large",
    kl_weight: float = 0.1,
    kd_weight: float = 1.0,
    fm_weight: float = 1.0,
    rank_sign: RankSign = "agree",
    public_x: torch.Tensor | None = None,
    soft_labels: torch.Tensor | None = None,
) -> FedHelpLargeLearner | FedHelpSmallLearner:
    """The learner of a FedHelp ``role``, built the one way the simulation and real nodes share.

    A large client's private model is the registered ``large_model`` with as many outputs as ``small``'s
    private head, initialised under ``seed``; a small
    client needs the public images and their one-time foundation soft labels.
    """
    if role == "large":
        torch.manual_seed(seed)
        large = create_model(large_model, **_outputs(small))
        return FedHelpLargeLearner(
            client_id, small, large, data, default, seed, kl_weight=kl_weight, kd_weight=kd_weight,
            rank_sign=rank_sign,
        )  # fmt: skip
    if role == "small":
        if public_x is None or soft_labels is None:
            raise ValueError("a FedHelp small client needs the public images and their soft labels")
        return FedHelpSmallLearner(
            client_id, small, data, public_x, soft_labels, default, seed, fm_weight=fm_weight
        )
    raise ValueError(f"unknown FedHelp role {role!r}; a task says 'large' or 'small'")
