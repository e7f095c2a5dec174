"""The next student from a federation: a round's aggregate applied, held-out metrics, a new checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from hub.data.medmnist import load_medmnist
from hub.models.registry import DataConfig
from hub.training.checkpoint import CheckpointConfig, save_checkpoint
from hub.training.supervised import binary_auc

__all__ = ["AggregateMismatchError", "apply_aggregate", "held_out_metrics", "save_derived"]


class AggregateMismatchError(ValueError):
    """A round's aggregate does not fit the student (other tensor names or shapes); says which."""


def apply_aggregate(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Overwrite the student's tensors named in ``tensors`` (all of them, or a part such as its head).

    Nothing is changed unless every tensor fits: a name the student lacks, a shape or a non-finite value
    is refused, so a round of another architecture can never produce a half-updated student.
    """
    state = model.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise AggregateMismatchError(
            f"the aggregate holds tensors the student lacks ({unknown[:5]}); is it the same model?"
        )
    if not tensors:
        raise AggregateMismatchError("the aggregate holds no tensors")
    for name, arr in tensors.items():
        if tuple(arr.shape) != tuple(state[name].shape):
            raise AggregateMismatchError(
                f"{name!r} is {list(arr.shape)} in the aggregate, {list(state[name].shape)} in the student"
            )
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise AggregateMismatchError(f"{name!r} holds NaN or infinite values in the aggregate")
    with torch.no_grad():
        for name, arr in tensors.items():
            state[name].copy_(torch.from_numpy(np.asarray(arr)).to(state[name].dtype))
    return sorted(tensors)


@torch.inference_mode()
def held_out_metrics(
    model: nn.Module, data_config: DataConfig, dataset: str, data_root: Path | None = None
) -> dict[str, float]:
    """AUC and balanced accuracy on the dataset's public validation split (never seen in training)."""
    val = load_medmnist(dataset, "val", data_root)
    x = torch.from_numpy(data_config.preprocess(val.images))  # (N, 1, H, W)
    model.eval()
    logits = torch.cat([model(x[i : i + 512])[:, 0] for i in range(0, len(x), 512)]).numpy()
    y = np.asarray(val.labels).astype(np.int64).reshape(-1)
    return {
        "val_auc": float(binary_auc(y, logits)),
        "val_bacc": float(balanced_accuracy_score(y, (logits > 0).astype(np.int64))),
    }


def save_derived(
    path: Path, model: nn.Module, base: CheckpointConfig, metrics: Mapping[str, float], source: str
) -> Path:
    """The student as a new checkpoint of ``base``'s model and data, with its metrics and its source."""
    config = dataclasses.replace(
        base,
        metrics={k: float(v) for k, v in metrics.items()},
        train={"source": source},
        optimizer=None,
        history=[],
        created_at="",
    )
    return save_checkpoint(path, model, config)
