"""pFedNet over the wire, as the benchmark runs it: a real hub over HTTPS on loopback and three real clinic
nodes training with the torch learner (``fedclinic[train]``, out of process) on real labeled chest X-rays.

The first round asks each node for its sketch (label counts and the pooled mean of its training images, never
per patient); the hub builds the similarity graph and publishes it with the model. The next two rounds start
from the state the last one left (no ``--model``): each node trains the shared part and its own personal part
(head and GroupNorm affines), and the hub averages the shared part and fuses the personal parts over the
graph. The hub's state after them (graph, shared part, every node's personal part) and the model it publishes
are exactly what the simulation computes (``bench fl``'s strategy and learners, in process) for the same data,
settings and seed. Then one clinic is sent a student with its own personal part, and only that clinic.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_node.protocol.tensors import decode_tensors, encode_tensors
from hub.fl.pfednet import PFedNet
from hub.fl.registry import make_strategy
from hub.fl.state import state_from_arrays
from hub.fl.strategy import Config
from hub.models.registry import create_model
from hub.training.checkpoint import load_checkpoint
from hub.training.learners import LocalConfig, to_params
from hub.training.node_learner import clinic_data
from hub.training.pfednet_train import PFedNetLearner
from hub.training.simulation import run_federation
from tests.e2e.federation import (
    HUB_BIN,
    HubProcess,
    active_model,
    make_hub,
    wait_for,
)
from tests.e2e.torch_nodes import (
    labeled_set,
    node_logs,
    serve_fl_cnn_bundle,
    serve_torch_nodes,
    student_checkpoint,
)
from tests.edge_node.conftest import EdgeProcess, require_test_bundle

pytestmark = pytest.mark.slow

SEED = 11
#: Each clinic's slice of the PneumoniaMNIST train split: (first image, count).
SLICES = {"clinic-a": (0, 96), "clinic-b": (96, 48), "clinic-c": (144, 24)}
#: The benchmark's pFedNet (harness.flbench.methods.run_pfednet), as round settings.
SETTINGS: dict[str, Any] = {
    "personal": "head_norm",
    "graph_keys": "label_counts,feature_mean",
    "graph_k": 1,
    "lam": 10.0,
    "mean_gradient": False,
}
CLIENT: Config = {
    "model.norm": "group",
    "epochs": 1,
    "batch_size": 16,
    "seed": SEED,
    "augment": True,
    "randconv": True,
    "consistency": 12.0,
}


def _config_args() -> list[str]:
    settings = {**SETTINGS, **{f"client.{k}": v for k, v in CLIENT.items()}}
    return [arg for k, v in settings.items() for arg in ("--config", f"{k}={json.dumps(v)}")]


def _run_round(hub: HubProcess, *extra: str) -> dict[str, Any]:
    started = hub.cli_json("rounds", "start", "--strategy", "pfednet", *_config_args(), "-k", "3", *extra)
    return hub.round_ended(started["round_id"], 400)


@pytest.mark.timeout(900)
def test_pfednet_over_the_wire_is_the_simulation(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    require_test_bundle()
    sets = {n: labeled_set(tmp_path / f"{n}.npz", first, count) for n, (first, count) in SLICES.items()}
    torch.manual_seed(0)
    start = to_params(create_model("fl_cnn", norm="group"))
    (tmp_path / "start.npz").write_bytes(encode_tensors(start))
    hub = make_hub(tmp_path / "hub")
    hub.start()
    nodes: dict[str, EdgeProcess] = {}
    try:
        serve_torch_nodes(nodes, tmp_path, hub, {name: tmp_path / f"{name}.npz" for name in sets})
        ids = serve_fl_cnn_bundle(nodes, tmp_path, hub)

        rounds = [_run_round(hub, "--model", str(tmp_path / "start.npz"))]  # the sketch round
        rounds += [_run_round(hub), _run_round(hub)]  # two training rounds, each from the last one's state
        assert [r["state"] for r in rounds] == ["published"] * 3, (rounds, node_logs(nodes))

        # One clinic gets a student with its own personal part; the others keep serving what they served.
        made = subprocess.run(
            [
                str(HUB_BIN), "models", "from-round", str(rounds[-1]["round"]), "--node", "clinic-c",
                "--student", str(student_checkpoint(tmp_path / "student", start, "fl_cnn", norm="group")),
                "--out", str(tmp_path / "personal-c"), "--model-version", "1.2.0", "--no-int8", "--publish",
                "--format", "json", "--data-dir", str(hub.data_dir),
            ],
            capture_output=True, text=True, env=hub.env, timeout=500,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr[-3000:]
        report = json.loads(made.stdout)
        wait_for(
            "clinic-c to serve its own student",
            lambda: active_model(nodes["clinic-c"]) == (report["model_id"], "1.2.0"),
            timeout=180,
            every=1.0,
        )
        time.sleep(3.0)  # several heartbeats: the others must stay where they are
        assert {active_model(nodes[n])[1] for n in ("clinic-a", "clinic-b")} == {"1.0.1"}  # type: ignore[index]
    finally:
        for node in nodes.values():
            if node.alive():
                node.stop()
        hub.stop()

    # Round 1 asked for sketches of the training sets, and that is all that came back.
    numbers = [r["round"] for r in rounds]
    sketches = hub.query(
        "SELECT u.node_id, u.payload FROM updates u JOIN rounds r ON r.id = u.round_id WHERE r.number = :n",
        {"n": numbers[0]},
    )
    by_node = {node: decode_tensors(bytes(payload)) for node, payload in sketches}
    for name, data in sets.items():
        sketch = by_node[ids[name]]
        assert sorted(sketch) == ["feature_mean", "label_counts"]
        np.testing.assert_array_equal(sketch["label_counts"], np.bincount(data.y, minlength=2))

    # The simulation: the benchmark's strategy and learners, on the same images, settings and seed.
    order = sorted(ids.values())
    name_of = {v: k for k, v in ids.items()}
    simulated = make_strategy("pfednet", **SETTINGS, client_config=dict(CLIENT))
    assert isinstance(simulated, PFedNet)
    simulated.initialize(start, order)
    local = LocalConfig.from_task(CLIENT, LocalConfig())
    learners = {}
    for node_id in order:
        data = sets[name_of[node_id]]
        model = create_model("fl_cnn", norm="group")
        learners[node_id] = PFedNetLearner(node_id, model, clinic_data(data.x, data.y), local, SEED)
    run_federation(simulated, learners, 3)

    ((state_blob, result_artifact),) = hub.query(
        "SELECT strategy_state, result_artifact FROM rounds WHERE number = :n", {"n": numbers[-1]}
    )
    state = state_from_arrays(decode_tensors(bytes(state_blob)))
    assert simulated.graph is not None and state["graph_edges"] == [list(e) for e in simulated.graph.edges]
    want = simulated.state_dict()
    model_tensors = [k for k in want if k.startswith(("global/", "personal/"))]
    assert any(k.startswith("personal/2/features.0.norm") for k in model_tensors)
    for key in model_tensors:
        np.testing.assert_array_equal(state[key], want[key], err_msg=key)
    # The clinics' personal parts differ: each trained its own, and the fusion did not make them one.
    heads = [np.asarray(state[f"personal/{i}/head.weight"]) for i in range(3)]
    assert not np.array_equal(heads[0], heads[2])
    ((published_blob,),) = hub.query("SELECT data FROM artifacts WHERE id = :a", {"a": result_artifact})
    published = decode_tensors(bytes(published_blob))
    assert sorted(published) == sorted(start)
    for name, arr in simulated.published_params().items():
        np.testing.assert_array_equal(published[name], arr, err_msg=name)
    # clinic-c's student: the shared part with clinic-c's own personal part, not the mean.
    served = load_checkpoint(Path(report["checkpoint"])).build_model().state_dict()
    own = simulated.params_for(ids["clinic-c"])
    for name in ("head.weight", "features.0.norm.weight", "features.0.conv.weight"):
        np.testing.assert_array_equal(served[name].numpy(), own[name], err_msg=name)
    assert not np.array_equal(own["head.weight"], simulated.published_params()["head.weight"])
