"""Checkpoints that carry their config: safetensors weights + optimizer state, a JSON config, no pickle.

A checkpoint is a directory::

    config.json             model name/config, dataset, preprocessing, epoch, metrics, optimizer settings
    model.safetensors       model state_dict (parameters and BatchNorm buffers)
    optimizer.safetensors   optimizer per-parameter state (e.g. Adam moments), only when saved for resuming
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edge_node.protocol.durable_file import write_text_durably
from hub.models.registry import DataConfig, create_model

logger = logging.getLogger(__name__)

FORMAT = "fedclinic-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, or of an unknown format; the message says what to do."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Everything needed to rebuild the model, preprocess its input and resume its training."""

    model_name: str
    model_config: dict[str, Any]
    dataset: str
    data_config: DataConfig
    #: Number of completed epochs; training resumes at this epoch index.
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    #: Hyper-parameters of the run (seed, lr, batch size, ...), so a resume uses the same ones.
    train: dict[str, Any] = field(default_factory=dict)
    #: Optimizer class name and param_groups (hyper-parameters); its tensors live in optimizer.safetensors.
    optimizer: dict[str, Any] | None = None
    #: Per-epoch metrics so far.
    history: list[dict[str, float]] = field(default_factory=list)
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"name": self.model_name, "config": self.model_config},
            "dataset": self.dataset,
            "preprocessing": self.data_config.to_dict(),
            "epoch": self.epoch,
            "metrics": self.metrics,
            "train": self.train,
            "optimizer": self.optimizer,
            "history": self.history,
            "created_at": self.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointConfig:
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"unknown checkpoint format {data.get('format')!r} v{data.get('format_version')!r}; "
                f"expected {FORMAT} v{FORMAT_VERSION} (written by `fedclinic-hub train`)"
            )
        return cls(
            model_name=str(data["model"]["name"]),
            model_config=dict(data["model"]["config"]),
            dataset=str(data["dataset"]),
            data_config=DataConfig.from_dict(data["preprocessing"]),
            epoch=int(data["epoch"]),
            metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
            train=dict(data.get("train", {})),
            optimizer=data.get("optimizer"),
            history=list(data.get("history", [])),
            created_at=str(data.get("created_at", "")),
        )


@dataclass
class Checkpoint:
    config: CheckpointConfig
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    path: Path

    def build_model(self) -> nn.Module:
        """The model with these weights, in eval mode."""
        model = create_model(self.config.model_name, **self.config.model_config)
        model.load_state_dict(self.model_state, strict=True)
        model.eval()
        return model


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (hyper-parameters, scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    config: CheckpointConfig,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write a checkpoint directory; config.json goes last: a present config means a complete checkpoint."""
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).unlink(missing_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / MODEL_FILE), metadata={"format": FORMAT, "model": config.model_name})
    cfg = config
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(path / OPTIMIZER_FILE), metadata={"format": FORMAT})
        cfg = CheckpointConfig(**{**config.__dict__, "optimizer": {"name": type(optimizer).__name__, **meta}})
    else:
        (path / OPTIMIZER_FILE).unlink(missing_ok=True)
    write_text_durably(path / CONFIG_FILE, json.dumps(cfg.to_json(), indent=2, sort_keys=True) + "\n")
    logger.debug("saved checkpoint %s (epoch %d)", path, config.epoch)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint directory (never unpickles anything)."""
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint: {CONFIG_FILE} is missing. Pass a directory written by "
            "`fedclinic-hub train`, e.g. runs/<name>/best or runs/<name>/last"
        )
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    config = CheckpointConfig.from_json(data)
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise CheckpointError(f"{model_path} is missing; the checkpoint is incomplete")
    model_state = load_file(str(model_path))
    optimizer_state = None
    if config.optimizer is not None and (path / OPTIMIZER_FILE).is_file():
        optimizer_state = _unflatten_optimizer(load_file(str(path / OPTIMIZER_FILE)), config.optimizer)
    return Checkpoint(config=config, model_state=model_state, optimizer_state=optimizer_state, path=path)
