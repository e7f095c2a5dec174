"""Supervised training on real PneumoniaMNIST: progress output, checkpoints, exact resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from hub.training.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from hub.training.supervised import TrainConfig, train_supervised

# Small but real: 256 PneumoniaMNIST train images, full val split for the AUC.
QUICK = TrainConfig(epochs=2, max_train_samples=256, batch_size=64, seed=3)


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=120, force_terminal=False), buf


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, str]:
    console, buf = _console()
    out = tmp_path_factory.mktemp("run")
    train_supervised(QUICK, out, console=console, data_root=shared_data)
    return out, buf.getvalue()


def test_training_reports_progress_and_val_auc(two_epoch_run: tuple[Path, str]) -> None:
    _, text = two_epoch_run
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert text.count("val_auc") == 2
    assert "4/4" in text  # 256 images / batch 64 = 4 steps, shown by the progress bar


def test_training_learns_something_real(two_epoch_run: tuple[Path, str]) -> None:
    out, _ = two_epoch_run
    cfg = load_checkpoint(out / "best").config
    # Chance is 0.5; even 2 short epochs on 256 real images separate pneumonia from normal well.
    assert cfg.metrics["val_auc"] > 0.8
    assert cfg.dataset == "pneumoniamnist"
    assert cfg.data_config.labels == ("normal", "pneumonia")


def test_checkpoint_round_trip(two_epoch_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = two_epoch_run
    ckpt = load_checkpoint(out / "last")
    assert ckpt.config.epoch == 2
    assert [row["epoch"] for row in ckpt.config.history] == [1.0, 2.0]
    model = ckpt.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert ckpt.optimizer_state is not None
    optimizer.load_state_dict(ckpt.optimizer_state)

    again = save_checkpoint(tmp_path / "copy", model, ckpt.config, optimizer)
    reloaded = load_checkpoint(again)
    assert reloaded.config.to_json()["model"] == ckpt.config.to_json()["model"]
    assert reloaded.config.data_config == ckpt.config.data_config
    for name, tensor in ckpt.model_state.items():
        assert torch.equal(reloaded.model_state[name], tensor), name
    assert reloaded.optimizer_state is not None
    for pid, state in ckpt.optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(reloaded.optimizer_state["state"][pid][key], value)
    # Self-describing and pickle-free: JSON config + safetensors files only.
    assert sorted(p.name for p in again.iterdir()) == sorted([CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE])
    cfg = json.loads((again / CONFIG_FILE).read_text())
    assert cfg["preprocessing"]["mean"] == list(ckpt.config.data_config.mean)
    assert cfg["optimizer"]["name"] == "Adam"


def test_resume_continues_from_the_saved_epoch_and_replays_exactly(
    two_epoch_run: tuple[Path, str], tmp_path: Path, shared_data: Path
) -> None:
    straight, _ = two_epoch_run
    console, _ = _console()
    first = train_supervised(
        TrainConfig(**{**QUICK.__dict__, "epochs": 1}), tmp_path, console=console, data_root=shared_data
    )
    assert load_checkpoint(first.last_path).config.epoch == 1
    console2, buf2 = _console()
    resumed = train_supervised(
        QUICK, tmp_path / "resumed", resume=first.last_path, console=console2, data_root=shared_data
    )
    text = buf2.getvalue()
    assert "epoch 2/2" in text and "epoch 1/" not in text  # the resumed run did not redo epoch 1
    assert [row["epoch"] for row in resumed.history] == [1.0, 2.0]
    a = load_checkpoint(straight / "last").model_state
    b = load_checkpoint(resumed.last_path).model_state
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between a straight and a resumed run"


def test_resume_past_the_last_epoch_is_refused(two_epoch_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = two_epoch_run
    with pytest.raises(ValueError, match="already at epoch 2"):
        train_supervised(QUICK, tmp_path, resume=out / "last", console=_console()[0])


def test_loading_a_non_checkpoint_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(tmp_path)


def test_checkpoint_config_round_trips_through_json(two_epoch_run: tuple[Path, str]) -> None:
    out, _ = two_epoch_run
    cfg = load_checkpoint(out / "best").config
    assert CheckpointConfig.from_json(cfg.to_json()).to_json() == cfg.to_json()
