"""Torch learners for simulated clinics: params ↔ numpy, local training, metrics, the supervised learner."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from hub.fl.strategy import ClientResult, ClientTask, Config, Params
from hub.training.augment import IntensityAugment, RandomConvolution
from hub.training.datasets import NORM_MEAN, NORM_STD, ClinicData
from hub.training.sam import sharpness_aware_backward
from hub.training.supervised import binary_auc


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """Rendered image in [0, 1] → model input."""
    return (x01 - NORM_MEAN) / NORM_STD


def to_params(module: nn.Module) -> Params:
    """The module's state as numpy copies (parameters and buffers, e.g. BN running statistics)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_params(module: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Overwrite the named tensors of ``module`` (a subset is fine; unknown names are an error)."""
    state = module.state_dict()
    unknown = sorted(set(params) - set(state))
    if unknown:
        raise KeyError(f"tensors {unknown[:5]} are not in the model")
    with torch.no_grad():
        for name, arr in params.items():
            state[name].copy_(torch.from_numpy(np.asarray(arr)).to(state[name].dtype))


def local_result(
    client_id: str, task: ClientTask, model: nn.Module, num_examples: int, losses: Sequence[float]
) -> ClientResult:
    """What a client uploads after local training: the change from the task's params, and its mean loss."""
    return ClientResult(
        client_id=client_id,
        round=task.round,
        num_examples=num_examples,
        update=delta(to_params(model), task.params),
        metrics={"train_loss": float(np.mean(losses)) if len(losses) else math.nan},
    )


def delta(after: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> Params:
    """update = local_after − params_sent for exactly the sent tensors, in their dtype."""
    return {name: np.asarray(after[name] - arr).astype(arr.dtype) for name, arr in sent.items()}


def minibatches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering ``n`` items once (the last batch may be smaller)."""
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def primary_logits(out: torch.Tensor) -> torch.Tensor:
    """A model's output (B, K) as the task's logits: (B,) for one sigmoid logit, (B, K) for K classes."""
    return out[:, 0] if out.shape[1] == 1 else out


def task_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits on one logit (B,) against {0, 1}; softmax cross-entropy on (B, K) against class ids."""
    if logits.ndim == 1:
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits, y.long())


@torch.inference_mode()
def predict(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], x01: torch.Tensor) -> np.ndarray:
    """Primary-task logits of a single-input model on rendered images (N, 1, H, W) in [0, 1]: (N,) for a
    binary model (one logit), (N, K) for a K-class model."""
    if isinstance(model, nn.Module):
        model.eval()
    out = [primary_logits(model(normalize(x01[i : i + 512]))) for i in range(0, len(x01), 512)]
    return torch.cat(out).numpy().astype(np.float64)


def binary_metrics(labels: torch.Tensor | np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """AUC and balanced accuracy (threshold: logit 0, i.e. probability 0.5); NaN AUC for one class."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if not np.all(np.isfinite(logits)):
        return {"auc": math.nan, "bacc": math.nan}
    return {
        "auc": binary_auc(y, logits),
        "bacc": float(balanced_accuracy_score(y, (logits > 0).astype(np.int64))),
    }


def supervised_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task's loss on a batch: BCE for a one-logit model, cross-entropy for a K-class one."""
    return task_loss(primary_logits(model(x)), y)


def proximal_term(model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ ‖w − w_anchor‖² over the anchored parameters (FedProx's term without mu/2)."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        ref = anchor.get(name)
        if ref is not None:
            total = total + ((p - ref) ** 2).sum()
    return total


def proximal_anchor(params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The float tensors of ``params`` (the model a clinic was sent) as the anchor of ``proximal_term``."""
    return {k: torch.from_numpy(np.array(v)) for k, v in params.items() if v.dtype.kind == "f"}


@dataclass(frozen=True)
class LocalConfig:
    """Local optimisation settings: fresh Adam every round (docs/benchmarks.md)."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    augment: bool = False
    mu: float = 0.0
    #: Weight of the agreement term across views (``view_consistency``); 0 = off. Needs ``augment``.
    consistency: float = 0.0
    #: Random convolutions (``RANDCONV``) after the augmentation, in every augmented view. Needs ``augment``.
    randconv: bool = False
    #: Sharpness-aware minimisation's radius ρ (``hub.training.sam``); 0 = plain gradient steps.
    sam_rho: float = 0.0

    @classmethod
    def from_task(cls, config: Config, default: LocalConfig) -> LocalConfig:
        """Task config keys override the learner's defaults (from the strategy's ``client_config``)."""
        return cls(
            epochs=int(config.get("epochs", default.epochs)),
            lr=float(config.get("lr", default.lr)),
            batch_size=int(config.get("batch_size", default.batch_size)),
            weight_decay=float(config.get("weight_decay", default.weight_decay)),
            augment=bool(config.get("augment", default.augment)),
            mu=float(config.get("mu", default.mu)),
            consistency=float(config.get("consistency", default.consistency)),
            randconv=bool(config.get("randconv", default.randconv)),
            sam_rho=float(config.get("sam_rho", default.sam_rho)),
        )


AUGMENT = IntensityAugment()
RANDCONV = RandomConvolution()


def augmented_input(x01: torch.Tensor, randconv: bool, gen: torch.Generator) -> torch.Tensor:
    """One augmented view as the network's input: ``AUGMENT``, normalised, then ``RANDCONV`` if asked."""
    z = normalize(AUGMENT(x01, gen))
    return RANDCONV(z, gen) if randconv else z


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The task's logits as class distributions (B, K): [1 − σ, σ] for one logit (B,), softmax for (B, K)."""
    if logits.ndim == 1:
        p = torch.sigmoid(logits)
        return torch.stack([1 - p, p], dim=1)
    return F.softmax(logits, dim=1)


def view_consistency(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Jensen-Shannon divergence among the predictions on several views of the same images, batch mean.

    ``views``: logits of each view, the same images in the same order. 0 when every view predicts the same
    distribution for every image; at most log(number of views).
    """
    probs = [class_probabilities(v).clamp_min(1e-7) for v in views]
    mix = torch.stack(probs).mean(dim=0)
    kl = [(p * (p.log() - mix.log())).sum(dim=1) for p in probs]
    return torch.stack(kl).mean(dim=0).mean()


def consistency_views(x01: torch.Tensor, gen: torch.Generator, *, randconv: bool = False) -> torch.Tensor:
    """The batch three times, as the network's input (3B, 1, H, W): as it is, then under two independent
    draws of the training augmentation (with random convolutions when ``randconv``)."""
    first, second = augmented_input(x01, randconv, gen), augmented_input(x01, randconv, gen)
    return torch.cat([normalize(x01), first, second])


def view_loss(model: nn.Module, views: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """The task's loss on the first augmented view plus ``weight`` × the three views' disagreement
    (``views`` from ``consistency_views``)."""
    b = len(y)
    logits = primary_logits(model(views))
    plain, first, second = logits[:b], logits[b : 2 * b], logits[2 * b :]
    return task_loss(first, y) + weight * view_consistency([plain, first, second])


def train_local(
    model: nn.Module,
    x01: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalConfig,
    gen: torch.Generator,
    *,
    prox_anchor: Mapping[str, torch.Tensor] | None = None,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> float:
    """Train ``cfg.epochs`` passes over (x01, y); returns the mean loss of the last epoch.

    ``cfg.consistency`` > 0 (with ``cfg.augment``) adds the agreement term across views (``view_loss``);
    ``cfg.randconv`` (with ``cfg.augment``) passes every augmented view through random convolutions;
    ``cfg.sam_rho`` > 0 takes every step with the sharpness-aware gradient (``hub.training.sam``) of the
    same batch, views and all. ``optimizer`` builds the optimiser for ``model`` (default: a fresh Adam at
    ``cfg.lr``).
    """
    if cfg.consistency > 0 and not cfg.augment:
        raise ValueError("consistency across views needs augment: there is only one view without it")
    if cfg.randconv and not cfg.augment:
        raise ValueError("randconv is a stage of the augmentation: set augment too")
    if not 0 <= cfg.sam_rho < math.inf:
        raise ValueError(f"sam_rho is a radius, 0 or above; got {cfg.sam_rho}")
    if optimizer is None:
        opt: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
    else:
        opt = optimizer(model)
    model.train()
    last = math.nan
    for _ in range(cfg.epochs):
        losses = []
        for idx in minibatches(len(y), cfg.batch_size, gen):
            batch_loss = _batch_loss(model, x01[idx], y[idx], cfg, gen, prox_anchor)
            if cfg.sam_rho > 0:
                losses.append(sharpness_aware_backward(model, batch_loss, cfg.sam_rho))
            else:
                loss = batch_loss()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                losses.append(float(loss.detach()))
            opt.step()
        last = float(np.mean(losses)) if losses else math.nan
    return last


def _batch_loss(
    model: nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor,
    cfg: LocalConfig,
    gen: torch.Generator,
    prox_anchor: Mapping[str, torch.Tensor] | None,
) -> Callable[[], torch.Tensor]:
    """The loss of one minibatch ``xb`` (b, 1, H, W) in [0, 1] at the model's current weights, its
    augmented views drawn now, once, so that every call computes the same batch's loss."""
    if cfg.consistency > 0:
        views = consistency_views(xb, gen, randconv=cfg.randconv)
    else:
        views = augmented_input(xb, cfg.randconv, gen) if cfg.augment else normalize(xb)

    def loss() -> torch.Tensor:
        if cfg.consistency > 0:
            value = view_loss(model, views, yb, cfg.consistency)
        else:
            value = supervised_loss(model, views, yb)
        if prox_anchor is not None and cfg.mu > 0:
            value = value + 0.5 * cfg.mu * proximal_term(model, prox_anchor)
        return value

    return loss


class SupervisedLearner:
    """A clinic running plain local training on the tensors a weights_delta task sends (FedAvg/Prox/BN).

    Tensors the task does not send (FedBN's norms) stay as this clinic's own: they persist in ``model``.
    """

    def __init__(
        self, client_id: str, model: nn.Module, data: ClinicData, default: LocalConfig, seed: int
    ) -> None:
        self.client_id = client_id
        self.model = model
        self.data = data
        self.default = default
        self.gen = torch.Generator().manual_seed(seed)

    def fit(self, task: ClientTask) -> ClientResult:
        cfg = LocalConfig.from_task(task.config, self.default)
        load_params(self.model, task.params)
        loss = train_local(
            self.model,
            self.data.train_x,
            self.data.train_y,
            cfg,
            self.gen,
            prox_anchor=proximal_anchor(task.params),
        )
        return local_result(self.client_id, task, self.model, self.data.n_train, [loss])

    def predict(self, x01: torch.Tensor) -> np.ndarray:
        return predict(self.model, x01)

    def state(self) -> Params:
        """Everything needed to resume this clinic: its model (incl. its own norms) and its RNG."""
        return {**to_params(self.model), "__rng__": self.gen.get_state().numpy().copy()}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        load_params(self.model, {k: v for k, v in state.items() if k != "__rng__"})
        self.gen.set_state(torch.from_numpy(np.array(state["__rng__"])))
