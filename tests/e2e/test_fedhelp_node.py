"""FedHelp's roles over the wire: a real hub over HTTPS on loopback, a real hospital node in the large-client
role (dual KD) and a real clinic node in the small-client role, both training with the torch learner
(``fedclinic[train]``, out of process) on real labeled chest X-rays.

Each node's uploaded update is exactly the simulation's for the same data, task and seed; only the small
model travels, the private large model stays in the hospital's learner directory, and the public set ships
once to the small client. The hub turns the round into the next student (`models from-round`: exported,
signed, published) and the nodes serve it.
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
from edge_node.protocol.updates import UpdateKind
from hub.fl.strategy import ClientTask
from hub.models.registry import create_model
from hub.training.learners import to_params
from hub.training.node_learner import CLIENT_ID, PublicSet, build_learner, clinic_data
from tests.e2e.federation import HUB_BIN, active_model, make_hub, wait_for
from tests.e2e.torch_nodes import labeled_set, serve_torch_nodes, student_checkpoint
from tests.edge_node.conftest import EdgeProcess

pytestmark = pytest.mark.slow

SEED = 11
N_TRAIN = 192


@pytest.mark.timeout(900)
def test_fedhelp_roles_over_the_wire_and_the_next_student(tmp_path: Path) -> None:
    """A hospital node takes the large role (dual KD), a clinic node the small role with the public set the
    hub ships once; the round becomes the next student, which the nodes verify and serve."""
    torch.set_num_threads(1)
    sets = {
        "hospital-a": labeled_set(tmp_path / "hospital-a.npz", 0, N_TRAIN),
        "clinic-b": labeled_set(tmp_path / "clinic-b.npz", N_TRAIN, 48),
    }
    hub = make_hub(tmp_path / "hub")
    hub.start()
    nodes: dict[str, EdgeProcess] = {}
    try:
        serve_torch_nodes(nodes, tmp_path, hub, {name: tmp_path / f"{name}.npz" for name in sets})
        ids = {n: str(_heartbeat(hub, n)) for n in nodes}
        torch.manual_seed(0)
        start = to_params(create_model("fedhelp_small"))
        (tmp_path / "start.npz").write_bytes(encode_tensors(start))
        public_file = tmp_path / "public.npz"
        subprocess.run(
            [str(HUB_BIN), "data", "public", "--out", str(public_file), "--size", "64", "--epochs", "1"],
            check=True, capture_output=True, env=hub.env, timeout=300,
        )  # fmt: skip
        started = hub.cli_json(
            "rounds", "start", "--strategy", "fedhelp", "--large", ids["hospital-a"],
            "--model", str(tmp_path / "start.npz"), "--public", str(public_file),
            "--config", "client.model=fedhelp_small", "--config", "client.epochs=1",
            "--config", "client.batch_size=32", "--config", f"client.seed={SEED}",
            "-k", "2", "--deadline", "500",
        )  # fmt: skip
        round_id = started["round_id"]
        done = hub.round_ended(round_id, 500)
        assert done["state"] == "published", (done, [n.log_text()[-2000:] for n in nodes.values()])

        # The round becomes the next student: exported, signed, published; the nodes verify and serve it.
        student = student_checkpoint(tmp_path / "student", start, "fedhelp_small")
        made = subprocess.run(
            [
                str(HUB_BIN), "models", "from-round", str(started["round"]), "--student", str(student),
                "--out", str(tmp_path / "next"), "--model-version", "1.1.0", "--no-int8", "--publish",
                "--format", "json", "--data-dir", str(hub.data_dir),
            ],
            capture_output=True, text=True, env=hub.env, timeout=500,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr[-3000:]
        report = json.loads(made.stdout)
        provenance = report["provenance"]
        assert (provenance["round"], provenance["federation"]) == (started["round"], hub.url)
        serving = (report["model_id"], "1.1.0")
        wait_for(
            "the nodes to serve the student of the round",
            lambda: all(active_model(node) == serving for node in nodes.values()),
            timeout=180,
            every=1.0,
        )
    finally:
        for node in nodes.values():
            if node.alive():
                node.stop()
        hub.stop()

    public = decode_tensors(public_file.read_bytes())
    sent = {k: v for k, v in start.items() if not k.startswith("public_head")}
    for name, data in sets.items():
        rows = hub.query(
            "SELECT t.config, t.params_artifact, u.payload FROM tasks t JOIN updates u ON u.task_id = t.id "
            "WHERE t.round_id = :r AND t.node_id = :n",
            {"r": round_id, "n": ids[name]},
        )
        ((config_json, params_artifact, payload),) = rows
        config = json.loads(config_json) if isinstance(config_json, str) else dict(config_json)
        ((shipped_blob,),) = hub.query("SELECT data FROM artifacts WHERE id = :a", {"a": params_artifact})
        shipped = decode_tensors(bytes(shipped_blob))
        update = decode_tensors(bytes(payload))
        # Each task told its node its role; only the small client got the public set; only the small model
        # (without its public head) came back.
        assert config["role"] == ("large" if name == "hospital-a" else "small")
        assert ("public/soft_labels" in shipped) == (config["role"] == "small")
        assert sorted(update) == sorted(sent)
        # Exactly what the simulation computes for the same data, task and seed.
        held = PublicSet.from_arrays(public) if config["role"] == "small" else None
        learner = build_learner(config, clinic_data(data.x, data.y), SEED, held, strategy="fedhelp")
        expected = learner.fit(ClientTask(CLIENT_ID, 1, UpdateKind.WEIGHTS_DELTA, sent, config)).update
        assert any(np.abs(a).max() > 0 for a in expected.values())
        for tensor, arr in expected.items():
            np.testing.assert_array_equal(update[tensor], arr, err_msg=f"{name}: {tensor}")

    # The large model never left the hospital; the clinic kept the public set for later rounds.
    hospital_dir = nodes["hospital-a"].data_dir / "learning" / "torch"
    with np.load(hospital_dir / "private" / "state.npz", allow_pickle=False) as private:
        assert any(k.startswith("large.") for k in private.files)
    assert not any(b"large." in bytes(p) for (p,) in hub.query("SELECT payload FROM updates"))
    assert (nodes["clinic-b"].data_dir / "learning" / "torch" / "public.npz").is_file()


def _heartbeat(hub: Any, name: str) -> str | None:
    info = hub.nodes().get(name)
    return str(info["node_id"]) if info and info["last_heartbeat"] else None
