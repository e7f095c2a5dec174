"""The federation half of ``run_light_head``, with its tensors kept: for the bitwise comparison with the wire.

``run_light_head`` keeps its final shared head and the clinics' personal heads to itself; this runs the same
steps (``head_avg`` with the method's settings, ``LightClinic`` per clinic, ``run_federation``) on the same
frozen student and returns them. ``pixels`` chooses what the clinics learn from: the benchmark's float images
as they are (the simulation itself: its AUCs must equal the method's, which ``comparison`` checks), or the
8-bit pixels a DICOM instance carries (what a node reads), to tell the two paths' difference apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from harness.flbench.datasets import BenchData
from harness.flbench.frozen_student import FrozenStudent, binary_task
from harness.flbench.light_clinic import LightClinic
from harness.flbench.methods import BenchConfig
from harness.wirebench.site import to_uint8
from hub.fl.registry import make_strategy
from hub.training.simulation import run_federation

__all__ = ["Pixels", "ReplicaRun", "replay_light_head"]

Pixels = Literal["float", "uint8"]


@dataclass
class ReplicaRun:
    shared: dict[str, np.ndarray]
    personal: dict[str, tuple[np.ndarray, np.ndarray]]
    #: Per clinic, the training embeddings (N, D) the clinic learned from.
    embeddings: dict[str, np.ndarray]


def _pixels(x01: torch.Tensor, pixels: Pixels) -> torch.Tensor:
    if pixels == "float":
        return x01
    return torch.from_numpy(to_uint8(x01)[:, None].astype(np.float32) / np.float32(255.0))


def replay_light_head(
    data: BenchData, frozen: FrozenStudent, start: dict[str, np.ndarray], cfg: BenchConfig, seed: int,
    pixels: Pixels = "float",
) -> ReplicaRun:  # fmt: skip
    """``run_light_head``'s rounds from ``start`` (the student's tensors) on ``frozen``'s embeddings."""
    head = frozen.head
    strategy = make_strategy(
        "head_avg", head=f"{head.weight.name},{head.bias.name}", client_config={"seed": seed}
    )
    clinics: dict[str, LightClinic] = {}
    embeddings: dict[str, np.ndarray] = {}
    for c in data.names:
        logits, emb = frozen.logits_and_embedding(_pixels(data.clinics[c].train_x, pixels))
        y_c = data.clinics[c].train_y.numpy().astype(np.int64).reshape(-1)
        clinics[c] = LightClinic(c, head, binary_task(), logits, emb, y_c)
        embeddings[c] = emb
    strategy.initialize(start, list(data.names))
    run_federation(strategy, clinics, cfg.rounds)
    personal = {}
    for c, clinic in clinics.items():
        if clinic.personal is None:
            raise ValueError(f"clinic {c} trained no personal head: too few labels for the light learner")
        personal[c] = (clinic.personal.weight, clinic.personal.bias)
    return ReplicaRun(dict(strategy.global_params), personal, embeddings)
