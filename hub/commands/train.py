"""`fedclinic-hub train`: supervised training of a registered model on a local MedMNIST dataset."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hub.commands.choices import DatasetName, ModelName
from hub.commands.output import EXIT_FAILED

#: What a run writes into its folder; a folder holding either is an existing run.
RUN_DIRS = ("best", "last")


def existing_run(out: Path) -> list[Path]:
    """The checkpoint folders of a run already in ``out`` (empty when there is none)."""
    return [out / name for name in RUN_DIRS if (out / name).exists()]


def train(
    model: Annotated[ModelName, typer.Option("--model", help="Registered model to train.")],
    dataset: Annotated[DatasetName, typer.Option("--dataset", help="Local MedMNIST dataset.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder; checkpoints go to OUT/best and OUT/last.")],
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, help="Total epochs (a resume continues to this).")
    ] = 10,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Checkpoint to continue from, e.g. runs/x/last.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the run already in OUT (its best/ and last/).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for init, shuffling and dropout.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-3,
    max_train_samples: Annotated[
        int | None, typer.Option("--max-train-samples", min=1, help="Train on a random subset (quick runs).")
    ] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads.")] = 1,
) -> None:
    """Train a model; validation AUC is printed every epoch and the best epoch is kept in OUT/best.

    OUT must not hold a run already, unless --resume continues it or --force replaces it.
    """
    console = Console()
    found = existing_run(out)
    if found and resume is None and not force:
        console.print(
            f"[red]error:[/red] {out} already holds a run ({', '.join(p.name for p in found)}); "
            "choose a new --out, continue it with --resume OUT/last, or replace it with --force"
        )
        raise typer.Exit(EXIT_FAILED)
    # torch and the training code load only when there is training to do: --help stays instant.
    import torch

    from hub.data.medmnist import DataNotFoundError
    from hub.training.checkpoint import CheckpointError
    from hub.training.supervised import TrainConfig, train_supervised

    if found and force and resume is None:
        for path in found:
            shutil.rmtree(path)
    torch.set_num_threads(threads)
    config = TrainConfig(
        model=model.value,
        dataset=dataset.value,
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
        raise typer.Exit(EXIT_FAILED) from exc
    console.print(
        f"best val AUC {result.best_val_auc:.4f} at epoch {result.best_epoch}: [bold]{result.best_path}[/]"
    )
