"""FedBN over the wire, and deploying what it trained: a real hub over HTTPS on loopback and three clinic
nodes training with the torch learner (``fedclinic[train]``, out of process) on real labeled chest X-rays.

FedBN never sends a normalisation tensor: two rounds average everything else, exactly as the simulation does
for the same data, settings and seed. Its aggregate alone would give the student its starting model's norms,
so ``models from-round`` refuses it. A ``kept_tensors`` round then collects each node's own norms (as its
last round left them): the hub keeps their example-weighted mean (what a clinic that did not train gets,
the simulation's unseen clinic) and each node's copy, and ``models from-round --kept-from M --node NODE``
builds that clinic's own model: the shared tensors and its norms, bit for bit the simulation's clinic.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_node.protocol.tensors import decode_tensors, encode_tensors
from hub.fl.aggregate import weighted_mean
from hub.fl.fedbn import is_norm_tensor
from hub.fl.registry import make_strategy
from hub.fl.strategy import Config
from hub.models.registry import create_model
from hub.rounds.kept_plans import mean_part, node_part
from hub.training.checkpoint import load_checkpoint
from hub.training.learners import LocalConfig, SupervisedLearner, to_params
from hub.training.node_learner import clinic_data
from hub.training.simulation import run_federation
from tests.e2e.federation import HUB_BIN, HubProcess, make_hub
from tests.e2e.torch_nodes import (
    labeled_set,
    node_logs,
    serve_fl_cnn_bundle,
    serve_torch_nodes,
    student_checkpoint,
)
from tests.edge_node.conftest import EdgeProcess, require_test_bundle

pytestmark = pytest.mark.slow

SEED = 5
#: Each clinic's slice of the PneumoniaMNIST train split: (first image, count).
SLICES = {"clinic-a": (200, 96), "clinic-b": (296, 48), "clinic-c": (344, 24)}
CLIENT: Config = {"model.norm": "batch", "epochs": 1, "batch_size": 16, "seed": SEED, "augment": True}


def _config_args() -> list[str]:
    return [arg for k, v in CLIENT.items() for arg in ("--config", f"client.{k}={json.dumps(v)}")]


def _round(hub: HubProcess, *args: str) -> dict[str, Any]:
    started = hub.cli_json("rounds", "start", *args, "-k", "3", "--deadline", "600")
    return hub.round_ended(started["round_id"], 400)


def _from_round(hub: HubProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HUB_BIN), "models", "from-round", *args, "--format", "json", "--data-dir", str(hub.data_dir)],
        capture_output=True, text=True, env=hub.env, timeout=500,
    )  # fmt: skip


def _aggregate(hub: HubProcess, number: int) -> dict[str, np.ndarray]:
    ((blob,),) = hub.query(
        "SELECT a.data FROM artifacts a JOIN rounds r ON r.result_artifact = a.id WHERE r.number = :n",
        {"n": number},
    )
    return decode_tensors(bytes(blob))


@pytest.mark.timeout(900)
def test_fedbn_over_the_wire_deploys_each_clinic_s_own_norms(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    require_test_bundle()
    sets = {n: labeled_set(tmp_path / f"{n}.npz", first, count) for n, (first, count) in SLICES.items()}
    torch.manual_seed(0)
    start = to_params(create_model("fl_cnn", norm="batch"))
    (tmp_path / "start.npz").write_bytes(encode_tensors(start))
    student = student_checkpoint(tmp_path / "student", start, "fl_cnn", norm="batch")
    hub = make_hub(tmp_path / "hub")
    hub.start()
    nodes: dict[str, EdgeProcess] = {}
    try:
        serve_torch_nodes(nodes, tmp_path, hub, {name: tmp_path / f"{name}.npz" for name in sets})
        ids = serve_fl_cnn_bundle(nodes, tmp_path, hub)

        first = _round(hub, "--strategy", "fedbn", "--model", str(tmp_path / "start.npz"), *_config_args())
        second = _round(hub, "--strategy", "fedbn", *_config_args())
        assert [first["state"], second["state"]] == ["published"] * 2, node_logs(nodes)
        trained = int(second["round"])

        # The aggregate alone would put the starting model's norms under the trained convolutions.
        refused = _from_round(
            hub, str(trained), "--student", str(student), "--out", str(tmp_path / "bare"), "--model-version",
            "1.1.0", "--no-int8",
        )  # fmt: skip
        assert refused.returncode != 0
        assert "left 15 tensors at the nodes" in refused.stderr and "kept_tensors" in refused.stderr
        assert not (tmp_path / "bare" / "bundle").exists()

        kept = _round(hub, "--strategy", "kept_tensors", "--model", str(tmp_path / "start.npz"))
        assert kept["state"] == "published", node_logs(nodes)
        made = _from_round(
            hub, str(trained), "--kept-from", str(kept["round"]), "--node", "clinic-c", "--student",
            str(student), "--out", str(tmp_path / "own-c"), "--model-version", "1.1.0", "--no-int8",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr[-3000:]
        assert "warning" not in made.stderr  # every node's norms come from the round deployed
        report = json.loads(made.stdout)
    finally:
        for node in nodes.values():
            if node.alive():
                node.stop()
        hub.stop()

    # The simulation: FedBN's strategy and learners on the same images, settings and seed.
    order = sorted(ids.values())
    name_of = {v: k for k, v in ids.items()}
    simulated = make_strategy("fedbn", client_config=dict(CLIENT))
    simulated.initialize(start, order)
    local = LocalConfig.from_task(CLIENT, LocalConfig())
    learners = {}
    for node_id in order:
        data = sets[name_of[node_id]]
        model = create_model("fl_cnn", norm="batch")
        learners[node_id] = SupervisedLearner(node_id, model, clinic_data(data.x, data.y), local, SEED)
    run_federation(simulated, learners, 2)

    shared = _aggregate(hub, trained)
    assert shared and not any(is_norm_tensor(n) for n in shared)
    for name, arr in simulated.global_params.items():
        np.testing.assert_array_equal(shared[name], arr, err_msg=name)
    # The kept round: each node's own norms, and their mean weighted by the images each trained on.
    collected = _aggregate(hub, int(kept["round"]))
    own = {node_id: to_params(learner.model) for node_id, learner in learners.items()}
    norms = sorted(n for n in start if is_norm_tensor(n))
    for node_id in order:
        part = node_part(collected, node_id)
        assert sorted(part) == norms
        for name in norms:
            np.testing.assert_array_equal(part[name], own[node_id][name], err_msg=f"{node_id}: {name}")
    want = weighted_mean(
        [{n: own[i][n] for n in norms} for i in order], [len(sets[name_of[i]]) for i in order]
    )
    for name, arr in want.items():
        np.testing.assert_array_equal(mean_part(collected)[name], arr, err_msg=name)
    # clinic-c's student: the shared tensors with its own norms, the model the simulation scores it with.
    served = {
        k: v.numpy()
        for k, v in load_checkpoint(Path(report["checkpoint"])).build_model().state_dict().items()
    }
    mine = {**own[ids["clinic-c"]], **simulated.global_params}
    assert sorted(served) == sorted(start)
    for name, arr in mine.items():
        np.testing.assert_array_equal(served[name], arr, err_msg=name)
    var = "features.0.norm.running_var"
    assert not np.array_equal(served[var], start[var]) and not np.array_equal(served[var], want[var])
