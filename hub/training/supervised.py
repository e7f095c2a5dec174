"""Supervised training of a registered model on MedMNIST: Adam, BCE-with-logits, val AUC, resumable."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.metrics import roc_auc_score
from torch import nn

from hub.data.medmnist import LABELS, load_medmnist
from hub.models.registry import create_model, get_data_config
from hub.training.checkpoint import CheckpointConfig, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

BEST_DIR = "best"
LAST_DIR = "last"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one supervised run; stored in every checkpoint so a resume uses the same ones."""

    model: str = "student_cnn_s"
    dataset: str = "pneumoniamnist"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    #: Train on a random subset of this many images (quick runs and tests); None = the whole train split.
    max_train_samples: int | None = None
    model_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    best_path: Path
    last_path: Path
    best_epoch: int
    best_val_auc: float
    history: list[dict[str, float]]


def _epoch_seed(seed: int, epoch: int) -> int:
    # Every epoch draws its shuffling and dropout from its own seed, so a resumed run replays exactly.
    return seed * 100_003 + epoch


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (N,) of a binary model on preprocessed input (N, C, H, W)."""
    model.eval()
    out = [model(torch.from_numpy(x[i : i + batch_size])).reshape(-1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (AUC is undefined then)."""
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


def train_supervised(
    config: TrainConfig,
    out_dir: Path,
    *,
    resume: Path | None = None,
    console: Console | None = None,
    data_root: Path | None = None,
) -> TrainResult:
    """Train ``config.model`` for ``config.epochs`` epochs, writing ``out_dir/last`` every epoch and
    ``out_dir/best`` whenever the validation AUC improves. With ``resume``, continue from that checkpoint's
    epoch using the hyper-parameters stored in it (only ``epochs`` may change)."""
    console = console or Console(stderr=True)
    start_epoch, history, best_auc, best_epoch = 0, [], -math.inf, -1
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        stored = TrainConfig(**ckpt.config.train)
        config = replace(stored, epochs=config.epochs)
        start_epoch, history = ckpt.config.epoch, list(ckpt.config.history)
        for row in history:
            if row["val_auc"] > best_auc:
                best_auc, best_epoch = row["val_auc"], int(row["epoch"])
        logger.info("resuming %s from epoch %d", resume, start_epoch)
        if start_epoch >= config.epochs:
            raise ValueError(
                f"nothing to train: the checkpoint is already at epoch {start_epoch}; pass --epochs above it"
            )

    if config.dataset not in LABELS or len(LABELS[config.dataset]) != 2:
        raise ValueError(
            f"supervised training here is binary; {config.dataset!r} is not a binary MedMNIST set"
        )
    torch.manual_seed(config.seed)
    model = create_model(config.model, **config.model_config)
    data_config = replace(get_data_config(config.model), labels=tuple(LABELS[config.dataset]))
    if data_config.num_outputs != 1:
        raise ValueError(
            f"model {config.model!r} has {data_config.num_outputs} outputs; binary training needs 1"
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is None:
            raise ValueError(
                f"{resume} holds no optimizer state; resume from a checkpoint written by training"
            )
        optimizer.load_state_dict(ckpt.optimizer_state)

    train = load_medmnist(config.dataset, "train", data_root)
    val = load_medmnist(config.dataset, "val", data_root)
    x_train = data_config.preprocess(train.images)  # (N, 1, 28, 28)
    y_train = train.labels.astype(np.float32)  # (N,)
    if config.max_train_samples is not None and config.max_train_samples < len(train):
        keep = np.random.default_rng(config.seed).choice(len(train), config.max_train_samples, replace=False)
        x_train, y_train = x_train[keep], y_train[keep]
    x_val, y_val = data_config.preprocess(val.images), val.labels
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    loss_fn = nn.BCEWithLogitsLoss()
    steps = math.ceil(len(xt) / config.batch_size)

    def checkpoint_config(epoch: int, metrics: dict[str, float]) -> CheckpointConfig:
        return CheckpointConfig(
            model_name=config.model,
            model_config=dict(config.model_config),
            dataset=config.dataset,
            data_config=data_config,
            epoch=epoch,
            metrics=metrics,
            train=asdict(config),
            history=list(history),
        )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        for epoch in range(start_epoch, config.epochs):
            seed = _epoch_seed(config.seed, epoch)
            torch.manual_seed(seed)
            order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))
            task = progress.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps, loss=float("nan"))
            model.train()
            total = 0.0
            for step in range(steps):
                idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                logits = model(xt[idx]).reshape(-1)  # (B,)
                loss = loss_fn(logits, yt[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach().item() * len(idx)
                progress.update(task, advance=1, loss=total / min((step + 1) * config.batch_size, len(xt)))
            val_logits = predict_logits(model, x_val)
            val_loss = float(
                loss_fn(torch.from_numpy(val_logits), torch.from_numpy(y_val.astype(np.float32)))
            )
            row = {
                "epoch": float(epoch + 1),
                "train_loss": total / len(xt),
                "val_loss": val_loss,
                "val_auc": binary_auc(y_val, val_logits),
            }
            history.append(row)
            improved = row["val_auc"] > best_auc
            progress.console.print(
                f"epoch {epoch + 1}/{config.epochs}: train_loss {row['train_loss']:.4f} "
                f"val_loss {val_loss:.4f} val_auc {row['val_auc']:.4f}"
                + (" [green](best)[/green]" if improved else "")
            )
            metrics = {k: v for k, v in row.items() if k != "epoch"}
            save_checkpoint(out_dir / LAST_DIR, model, checkpoint_config(epoch + 1, metrics), optimizer)
            if improved:
                best_auc, best_epoch = row["val_auc"], epoch + 1
                save_checkpoint(out_dir / BEST_DIR, model, checkpoint_config(epoch + 1, metrics), optimizer)

    best_path = out_dir / BEST_DIR
    if not best_path.exists() and resume is not None:
        # Resumed into a new folder and no epoch beat the earlier best: that one stays where it was.
        best_path = resume.parent / BEST_DIR
    return TrainResult(
        best_path=best_path,
        last_path=out_dir / LAST_DIR,
        best_epoch=best_epoch,
        best_val_auc=best_auc,
        history=history,
    )
