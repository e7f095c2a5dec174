"""Nodes that train with the torch learner (``fedclinic[train]``, out of process) on real labeled X-rays, and
the student checkpoint ``models from-round`` updates: what the e2e tests of torch strategies share."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_node.learning.prepared_set import write_prepared_set
from edge_node.learning.training_set import TrainingSet
from hub.data.medmnist import load_medmnist
from hub.models.registry import create_model
from tests.e2e.federation import HubProcess, enroll, make_node, wait_for
from tests.edge_node.conftest import EdgeProcess
from tests.support.student_checkpoint import pneumonia_checkpoint

__all__ = ["labeled_set", "serve_torch_nodes", "student_checkpoint", "torch_node"]


def labeled_set(path: Path, first: int, count: int) -> TrainingSet:
    """Real pneumonia X-rays with their labels, preprocessed as an fl_cnn bundle does: (x / 255 − 0.5) / 0.25;
    written to ``path`` as the node's prepared training set."""
    images = load_medmnist("pneumoniamnist", "train")
    x01 = images.images[first : first + count].astype(np.float32)[:, None] / 255.0  # (N, 1, 28, 28)
    data = TrainingSet(
        x=((x01 - 0.5) / 0.25).astype(np.float32),
        y=images.labels[first : first + count].astype(np.int64).reshape(-1),
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.10.{first + i}" for i in range(count)),
    )
    write_prepared_set(path, data)
    return data


def torch_node(root: Path, name: str, data_file: Path) -> EdgeProcess:
    """A node whose [learning] runs the torch learner on its labeled set; [privacy] allows small rounds."""
    node = make_node(root, name)
    learn = json.dumps([sys.executable, "-m", "hub.training.node_learner"])
    with node.config.open("a") as config:
        config.write(f'\n[learning]\ntorch_command = {learn}\ntraining_set_file = "{data_file}"\n')
        config.write("\n[privacy]\nmin_cohort = 1\n")
    return node


def serve_torch_nodes(
    nodes: dict[str, EdgeProcess], root: Path, hub: HubProcess, sets: dict[str, Path]
) -> None:
    """One torch node per labeled set file, enrolled at ``hub``, serving until each has sent a heartbeat.
    Each started node goes into ``nodes`` at once: the caller's cleanup stops it whatever fails next."""
    for name, data_file in sets.items():
        node = torch_node(root, name, data_file)
        enroll(hub, node, name)
        node.start()
        nodes[name] = node
    wait_for("the nodes' heartbeats", lambda: all(n["last_heartbeat"] for n in hub.nodes().values()))


def student_checkpoint(
    path: Path, params: dict[str, np.ndarray], model_name: str, **model_config: Any
) -> Path:
    """The student a federation started from (``params``), as the checkpoint `models from-round` updates."""
    model = create_model(model_name, **model_config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    return pneumonia_checkpoint(path, model, model_name, **model_config)
