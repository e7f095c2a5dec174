"""A student checkpoint on PneumoniaMNIST's labels and the benchmark's input scale, as `models from-round`
and `distill` read one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from hub.data.medmnist import LABELS
from hub.models.fl_cnn import FL_BENCH_28
from hub.training.checkpoint import CheckpointConfig, save_checkpoint

__all__ = ["pneumonia_checkpoint"]


def pneumonia_checkpoint(path: Path, model: nn.Module, name: str, **model_config: Any) -> Path:
    """``model`` (registry name ``name``, built with ``model_config``) saved at ``path`` as epoch 0."""
    config = CheckpointConfig(
        model_name=name,
        model_config=model_config,
        dataset="pneumoniamnist",
        data_config=replace(FL_BENCH_28, labels=tuple(LABELS["pneumoniamnist"])),
        epoch=0,
    )
    return save_checkpoint(path, model, config)
