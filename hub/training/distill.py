"""Distillation at the hub: teacher soft outputs on a transfer set → a compact student (≤ 1 M params)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from hub.data.medmnist import LABELS
from hub.models.fl_cnn import FL_BENCH_28, fl_cnn
from hub.models.registry import DataConfig
from hub.training.checkpoint import CheckpointConfig, save_checkpoint
from hub.training.fedhelp_kd import class_kl
from hub.training.learners import AUGMENT, minibatches, normalize, primary_logits

log = logging.getLogger(__name__)

#: The student the export step bundles must stay under this many parameters.
MAX_STUDENT_PARAMS = 1_000_000


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def distill_student(
    teacher: Callable[[torch.Tensor], torch.Tensor],
    transfer_x01: torch.Tensor,
    *,
    epochs: int = 10,
    min_steps: int = 0,
    seed: int = 0,
    temperature: float = 2.0,
    lr: float = 1e-3,
    batch_size: int = 64,
    augment: bool = True,
    student: nn.Module | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    num_outputs: int = 1,
) -> nn.Module:
    """Train ``student`` (default: the 93 k-parameter GroupNorm CNN) to match the teacher's logits.

    Loss: KL between the teacher's and the student's class distributions at temperature T (×T²): two
    classes from one logit, or the softmax over ``num_outputs`` class logits of a K-class teacher; on the
    transfer images, each batch freshly intensity-augmented so the student also matches the teacher off the
    transfer set's acquisition profile. No labels are needed. Training runs ``epochs`` passes, or more until
    ``min_steps`` optimiser steps (small transfer sets need more passes), with a cosine learning-rate decay.
    ``on_epoch(done, total)`` reports progress after each pass.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = student if student is not None else fl_cnn(norm="group", num_outputs=num_outputs)
    if count_params(net) > MAX_STUDENT_PARAMS:
        raise ValueError(
            f"student has {count_params(net)} parameters; the edge budget is {MAX_STUDENT_PARAMS}"
        )
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    per_epoch = math.ceil(len(transfer_x01) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / per_epoch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * per_epoch)
    for epoch in range(epochs):
        net.train()
        for idx in minibatches(len(transfer_x01), batch_size, gen):
            xb = transfer_x01[idx]
            if augment:
                xb = AUGMENT(xb, gen)
            x = normalize(xb)
            with torch.no_grad():
                z_teacher = primary_logits(teacher(x))
            loss = class_kl(z_teacher, primary_logits(net(x)), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
    net.eval()
    return net


def save_student(
    path: Path, student: nn.Module, dataset: str, metrics: Mapping[str, float], *, source: str
) -> Path:
    """Write the student as a checkpoint (safetensors + config.json) that `fedclinic-hub export` bundles.

    The student is the registered ``fl_cnn`` with GroupNorm; its preprocessing is (x − 0.5) / 0.25 on 28×28
    grey images, and its labels are ``dataset``'s (one logit for two classes, one per class for more).
    ``source`` says where it was trained (its provenance).
    """
    return save_checkpoint(path, student, student_config(dataset, metrics, source=source))


def student_config(dataset: str, metrics: Mapping[str, float], *, source: str) -> CheckpointConfig:
    """The checkpoint config of the default student (``fl_cnn`` with GroupNorm) for ``dataset``."""
    labels = tuple(LABELS[dataset])
    outputs = 1 if len(labels) == 2 else len(labels)
    data_config: DataConfig = replace(FL_BENCH_28, labels=labels, num_outputs=outputs)
    return CheckpointConfig(
        model_name="fl_cnn",
        model_config={"norm": "group", **({"num_outputs": outputs} if outputs > 1 else {})},
        dataset=dataset,
        data_config=data_config,
        epoch=0,
        metrics={k: float(v) for k, v in metrics.items()},
        train={"source": source},
    )
