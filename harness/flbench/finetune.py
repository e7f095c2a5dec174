"""Local fine-tuning after the federation (FedAvg+FT, the usual personalisation baseline): each clinic
trains a copy of the model it was given on its own training images for a few more epochs, and keeps the
number of epochs whose validation loss is lowest.

The budgets are ``FINETUNE_EPOCHS`` (0 = the model as the federation left it), fresh Adam at the config's
``finetune_lr``, the clinic's own training options (augmentation, agreement term, random convolutions). The
choice reads the validation split only, and by its loss (cross-entropy), not its AUC: a small clinic's 6–10
validation images give an AUC of 1.0 to most models, which would choose nothing. Each budget's test AUC is
recorded too, as the curve a reader checks the choice against; nothing reads it to choose.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from harness.flbench.datasets import BenchData
from harness.flbench.scoring import Predictor
from hub.training.learners import LocalConfig, normalize, predict, primary_logits, task_loss, train_local

__all__ = ["FINETUNE_EPOCHS", "fine_tune"]

#: The fine-tuning budgets a clinic chooses from, in epochs over its own training images.
FINETUNE_EPOCHS: tuple[int, ...] = (0, 1, 2, 4)

#: Each clinic's test metrics for its predictor (``harness.flbench.methods.clinic_scores``).
ScoreClinics = Callable[[Mapping[str, Predictor]], dict[str, dict[str, float]]]


def validation_loss(model: nn.Module, x01: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy of ``model`` on (x01, y); NaN on an empty split."""
    if len(y) == 0:
        return math.nan
    model.eval()
    with torch.no_grad():
        return float(task_loss(primary_logits(model(normalize(x01))), y))


def fine_tune(
    data: BenchData,
    models: Mapping[str, nn.Module],
    local: LocalConfig,
    lr: float,
    seed: int,
    score_clinics: ScoreClinics,
) -> tuple[dict[str, Predictor], dict[str, Any]]:
    """Each clinic's fine-tuned model at the budget its validation loss chooses (ties and an empty split:
    fewer epochs); returns the predictors and what to record (chosen epochs, validation losses, the test AUC
    of every clinic at every budget from ``score_clinics``). ``models`` are copied, never changed."""
    tuned: dict[int, dict[str, nn.Module]] = {}
    losses: dict[str, dict[int, float]] = {}
    for k, name in enumerate(data.names):
        clinic = data.clinics[name]
        model = copy.deepcopy(models[name])
        gen = torch.Generator().manual_seed(seed * 1000 + 500 + k)
        done = 0
        losses[name] = {}
        for epochs in FINETUNE_EPOCHS:
            if epochs > done:
                train_local(
                    model, clinic.train_x, clinic.train_y, replace(local, epochs=epochs - done, lr=lr), gen
                )
                done = epochs
            tuned.setdefault(epochs, {})[name] = copy.deepcopy(model).eval()
            losses[name][epochs] = validation_loss(model, clinic.val_x, clinic.val_y)
    chosen = {name: _choose(losses[name]) for name in data.names}
    curve = {
        str(e): {c: m["auc"] for c, m in score_clinics(_predictors(tuned[e])).items()}
        for e in FINETUNE_EPOCHS
    }
    predictors = _predictors({name: tuned[chosen[name]][name] for name in data.names})
    extra = {
        "finetune_epochs": chosen,
        "finetune_val_loss": {c: {str(e): v for e, v in by.items()} for c, by in losses.items()},
        "finetune_auc_by_epochs": curve,
    }
    return predictors, extra


def _choose(losses: Mapping[int, float]) -> int:
    finite = {e: v for e, v in losses.items() if math.isfinite(v)}
    if not finite:
        return 0
    best = min(finite.values())
    return min(e for e, v in finite.items() if v <= best)


def _predictors(models: Mapping[str, nn.Module]) -> dict[str, Predictor]:
    return {name: _bind(model) for name, model in models.items()}


def _bind(model: nn.Module) -> Predictor:
    return lambda x: predict(model, x)
