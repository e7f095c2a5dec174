"""The starting student of ``bench fl``'s ``light_head`` method, rebuilt bit for bit, and its checkpoint.

``light_head`` pretrains ``student_cnn_s`` at the two hospitals (pooled, rounds × local_epochs epochs) and
freezes its backbone; over the wire the hub ships that same student to the clinics as a signed bundle. The
steps below are the method's own, in its order and with its seeds, so that both sides start from one model
(``comparison`` checks it: the initial per-clinic AUCs of both must be identical).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from harness.flbench.datasets import BenchData
from harness.flbench.methods import BenchConfig
from hub.data.medmnist import LABELS
from hub.models.fl_cnn import FL_BENCH_28
from hub.models.student import student_cnn_s
from hub.training.checkpoint import CheckpointConfig, save_checkpoint
from hub.training.learners import LocalConfig, train_local

__all__ = ["MODEL", "light_student", "save_student"]

MODEL = "student_cnn_s"


def light_student(data: BenchData, cfg: BenchConfig, seed: int) -> nn.Module:
    """``run_light_head``'s pretraining: same seed, same pooled hospital data, same budget and generator."""
    torch.manual_seed(seed)
    student = student_cnn_s()
    large = [c for c in data.names if c not in data.small]
    x = torch.cat([data.clinics[c].train_x for c in large])
    y = torch.cat([data.clinics[c].train_y for c in large])
    pre = LocalConfig(epochs=cfg.rounds * cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size)
    train_local(student, x, y, pre, torch.Generator().manual_seed(seed * 100))
    return student.eval()


def save_student(path: Path, student: nn.Module, seed: int) -> Path:
    """A checkpoint the hub exports: the benchmark's input scale, (x − 0.5) / 0.25, as its preprocessing."""
    config = CheckpointConfig(
        model_name=MODEL,
        model_config={},
        dataset="pneumoniamnist",
        data_config=replace(FL_BENCH_28, labels=tuple(LABELS["pneumoniamnist"])),
        epoch=0,
        train={"seed": seed, "source": "bench fl light_head pretraining (hospitals A and B pooled)"},
    )
    return save_checkpoint(path, student, config)
