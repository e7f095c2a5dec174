"""The demo's first student: trained at the hub on public images only, kept at its best epoch."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from hub.data.medmnist import LABELS
from hub.models.registry import create_model, get_data_config
from hub.training.checkpoint import CheckpointConfig, save_checkpoint
from hub.training.supervised import binary_auc, predict_logits

__all__ = ["train_public_student"]

#: FedHelp's small shared model: its private head is the deployed classifier (the light learner's head on
#: the exported embedding), so FedHelp rounds, head rounds and the bundle export all take it as it is.
MODEL = "fedhelp_small"


def train_public_student(
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: Path,
    *,
    dataset: str,
    epochs: int,
    seed: int,
    console: Console,
) -> Path:
    """Train ``fedhelp_small`` (its private-head path) on public ``images`` (N, H, W) uint8; returns the
    best checkpoint directory.

    A fifth of the images (stratified by the seed) chooses the epoch; the other four fifths train.
    """
    torch.manual_seed(seed)
    model = create_model(MODEL)
    data_config = replace(get_data_config(MODEL), labels=tuple(LABELS[dataset]))
    x = torch.from_numpy(data_config.preprocess(images))  # (N, 1, 28, 28), normalised
    y = torch.from_numpy(labels.astype(np.float32))  # (N,)
    order = np.random.default_rng(seed).permutation(len(y))
    pick = order[: len(y) // 5]
    fit = order[len(y) // 5 :]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    best_auc, best = -math.inf, out_dir / "best"
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(fit)[torch.randperm(len(fit), generator=gen)]
        for start in range(0, len(perm), 64):
            idx = perm[start : start + 64]
            loss = loss_fn(model(x[idx]).reshape(-1), y[idx])  # logits (B,)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        auc = binary_auc(labels[pick], predict_logits(model, x[pick].numpy()))
        console.print(f"epoch {epoch + 1}/{epochs}: AUC on the public selection images {auc:.3f}")
        if auc > best_auc:
            best_auc = auc
            save_checkpoint(
                best,
                model,
                CheckpointConfig(
                    model_name=MODEL,
                    model_config={},
                    dataset=dataset,
                    data_config=data_config,
                    epoch=epoch + 1,
                    metrics={"public_selection_auc": auc},
                    train={"seed": seed, "epochs": epochs, "data": f"{dataset} val split (public)"},
                ),
            )
    return best
