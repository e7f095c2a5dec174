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
from tests.e2e.federation import HubProcess, active_model, enroll, make_node, signed_bundle, wait_for
from tests.edge_node.conftest import EdgeProcess, require_test_bundle
from tests.support.student_checkpoint import pneumonia_checkpoint

__all__ = [
    "FL_CNN_NORM",
    "labeled_set",
    "node_logs",
    "serve_fl_cnn_bundle",
    "serve_torch_nodes",
    "student_checkpoint",
    "torch_node",
]

#: The normalisation fl_cnn's learners train with; the bundle the nodes serve says the same.
FL_CNN_NORM = {"mean": [0.5], "std": [0.25]}


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


def serve_fl_cnn_bundle(nodes: dict[str, EdgeProcess], root: Path, hub: HubProcess) -> dict[str, str]:
    """The test bundle signed by ``hub`` as version 1.0.1 with fl_cnn's normalisation, published and served
    by every node in ``nodes``; the nodes' ids by name."""
    bundle = signed_bundle(
        require_test_bundle().bundle,
        root / "bundle",
        hub.signing_key(),
        version="1.0.1",
        preprocessing=FL_CNN_NORM,
    )
    hub.cli("models", "publish", str(bundle))
    wait_for("every node to serve the bundle", lambda: all(active_model(n) for n in nodes.values()), 120)
    return {name: str(info["node_id"]) for name, info in hub.nodes().items()}


def node_logs(nodes: dict[str, EdgeProcess]) -> list[str]:
    """The end of each node's log, for an assertion's message."""
    return [n.log_text()[-2000:] for n in nodes.values()]


def student_checkpoint(
    path: Path, params: dict[str, np.ndarray], model_name: str, **model_config: Any
) -> Path:
    """The student a federation started from (``params``), as the checkpoint `models from-round` updates."""
    model = create_model(model_name, **model_config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    return pneumonia_checkpoint(path, model, model_name, **model_config)
