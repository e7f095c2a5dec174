"""Fixtures for export tests: a student briefly trained on real PneumoniaMNIST, and its data splits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from hub.data.medmnist import ImageSet, load_medmnist
from hub.training.checkpoint import Checkpoint, load_checkpoint
from hub.training.supervised import TrainConfig, train_supervised


@pytest.fixture(scope="session")
def student_checkpoint(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Checkpoint:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("student")
    config = TrainConfig(epochs=2, max_train_samples=1024, seed=1)
    result = train_supervised(config, out, console=Console(quiet=True), data_root=shared_data)
    return load_checkpoint(result.best_path)


@pytest.fixture(scope="session")
def pneumonia_test(shared_data: Path) -> ImageSet:
    return load_medmnist("pneumoniamnist", "test", shared_data)


@pytest.fixture(scope="session")
def pneumonia_val(shared_data: Path) -> ImageSet:
    return load_medmnist("pneumoniamnist", "val", shared_data)
