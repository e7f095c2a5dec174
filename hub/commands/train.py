"""`fedclinic-hub train`: supervised training of a registered model on a local MedMNIST dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from hub.data.medmnist import DataNotFoundError
from hub.models.registry import list_models
from hub.training.checkpoint import CheckpointError
from hub.training.supervised import TrainConfig, train_supervised


def train(
    model: Annotated[str, typer.Option("--model", help=f"Registered model: {', '.join(list_models())}.")],
    dataset: Annotated[str, typer.Option("--dataset", help="Local MedMNIST dataset, e.g. pneumoniamnist.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder; checkpoints go to OUT/best and OUT/last.")],
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, help="Total epochs (a resume continues to this).")
    ] = 10,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Checkpoint to continue from, e.g. runs/x/last.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for init, shuffling and dropout.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-3,
    max_train_samples: Annotated[
        int | None, typer.Option("--max-train-samples", min=1, help="Train on a random subset (quick runs).")
    ] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads.")] = 1,
) -> None:
    """Train a model; validation AUC is printed every epoch and the best epoch is kept in OUT/best."""
    torch.set_num_threads(threads)
    console = Console()
    config = TrainConfig(
        model=model,
        dataset=dataset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        max_train_samples=max_train_samples,
    )
    try:
        result = train_supervised(config, out, resume=resume, console=console)
    except (KeyError, ValueError, CheckpointError, DataNotFoundError) as exc:
        console.print(f"[red]training failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(
        f"best val AUC {result.best_val_auc:.4f} at epoch {result.best_epoch}: [bold]{result.best_path}[/]"
    )
