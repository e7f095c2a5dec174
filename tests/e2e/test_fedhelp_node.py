"""FedHelp's large-client role over the wire: a real hub over HTTPS on loopback and a real hospital node that
trains with the torch learner (``fedclinic[train]``, out of process) on real labeled chest X-rays.

The node's uploaded update is exactly the simulation's for the same data, task and seed; only the small
proxy travels, and the private large model stays in the node's learner directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_node.learning.prepared_set import write_prepared_set
from edge_node.learning.training_set import TrainingSet
from edge_node.protocol.tensors import decode_tensors, encode_tensors
from edge_node.protocol.updates import UpdateKind
from hub.data.medmnist import load_medmnist
from hub.fl.strategy import ClientTask
from hub.models.registry import create_model
from hub.training.learners import to_params
from hub.training.node_learner import CLIENT_ID, build_learner, clinic_data
from tests.e2e.federation import enroll, make_hub, make_node, wait_for

pytestmark = pytest.mark.slow

SEED = 11
N_TRAIN = 192


def _hospital_set(path: Path) -> TrainingSet:
    """Real pneumonia X-rays with their labels, preprocessed as the bundle does: (x / 255 − 0.5) / 0.25."""
    images = load_medmnist("pneumoniamnist", "train")
    x01 = images.images[:N_TRAIN].astype(np.float32)[:, None] / 255.0  # (N, 1, 28, 28)
    data = TrainingSet(
        x=((x01 - 0.5) / 0.25).astype(np.float32),
        y=images.labels[:N_TRAIN].astype(np.int64).reshape(-1),
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.10.{i}" for i in range(N_TRAIN)),
    )
    write_prepared_set(path, data)
    return data


@pytest.mark.timeout(600)
def test_a_hospital_node_takes_the_fedhelp_large_role_over_the_wire(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = _hospital_set(tmp_path / "hospital-set.npz")
    hub = make_hub(tmp_path / "hub")
    hub.start()
    node = make_node(tmp_path, "hospital-a")
    # The node's [learning] and [privacy] sections: the torch learner, its labeled set; a one-node round.
    learn = json.dumps([sys.executable, "-m", "hub.training.node_learner"])
    with node.config.open("a") as config:
        config.write(f"\n[learning]\ntorch_command = {learn}\n")
        config.write(f'training_set_file = "{tmp_path / "hospital-set.npz"}"\n\n[privacy]\nmin_cohort = 1\n')
    try:
        enroll(hub, node, "hospital-a")
        node.start()
        node_id = wait_for("the node's first heartbeat", lambda: _heartbeat(hub, "hospital-a"))
        torch.manual_seed(0)
        start = to_params(create_model("fedhelp_small"))
        (tmp_path / "start.npz").write_bytes(encode_tensors(start))
        started = hub.cli_json(
            "rounds", "start", "--strategy", "fedhelp", "--large", node_id,
            "--model", str(tmp_path / "start.npz"),
            "--config", "client.model=fedhelp_small", "--config", "client.epochs=1",
            "--config", "client.batch_size=32", "--config", f"client.seed={SEED}",
            "-k", "1", "--deadline", "400",
        )  # fmt: skip
        round_id = started["round_id"]
        done = wait_for(
            "the round to publish its aggregate",
            lambda: (
                (r := hub.admin_call("GET", f"/v1/admin/rounds/{round_id}"))["state"]
                in ("published", "failed")
                and r
            ),
            timeout=400,
            every=1.0,
        )
        assert done["state"] == "published", (done, node.log_text()[-3000:])
    finally:
        if node.alive():
            node.stop()
        hub.stop()

    # The task told the node its role; the node answered with the proxy's delta only.
    ((config_json,),) = hub.query("SELECT config FROM tasks WHERE round_id = :r", {"r": round_id})
    task_config = json.loads(config_json) if isinstance(config_json, str) else dict(config_json)
    assert task_config["role"] == "large"
    ((payload,),) = hub.query("SELECT payload FROM updates WHERE round_id = :r", {"r": round_id})
    update = decode_tensors(bytes(payload))
    sent = {k: v for k, v in start.items() if not k.startswith("public_head")}
    assert sorted(update) == sorted(sent)

    # Exactly what the simulation computes for the same data, task and seed.
    learner = build_learner(task_config, clinic_data(data.x, data.y), SEED)
    expected = learner.fit(ClientTask(CLIENT_ID, 1, UpdateKind.WEIGHTS_DELTA, sent, task_config)).update
    assert any(np.abs(a).max() > 0 for a in expected.values())
    for name, arr in expected.items():
        np.testing.assert_array_equal(update[name], arr, err_msg=name)

    # The aggregate is the next small model; the large model never left the node.
    ((blob,),) = hub.query("SELECT data FROM artifacts WHERE id = :a", {"a": done["result_artifact"]})
    aggregate = decode_tensors(bytes(blob))
    name = "features.0.conv.weight"
    np.testing.assert_allclose(aggregate[name], sent[name] + update[name], rtol=0, atol=1e-7)
    state = node.data_dir / "learning" / "torch" / "private" / "state.npz"
    with np.load(state, allow_pickle=False) as private:
        large = [k for k in private.files if k.startswith("large.")]
    assert large and not any(k.startswith("large.") for k in update)
    assert not any(b"large." in bytes(p) for (p,) in hub.query("SELECT payload FROM updates"))


def _heartbeat(hub: Any, name: str) -> str | None:
    info = hub.nodes().get(name)
    return str(info["node_id"]) if info and info["last_heartbeat"] else None
