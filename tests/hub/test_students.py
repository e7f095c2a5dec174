"""`fedclinic-hub models from-round` and `fedclinic-hub distill` on a real hub data directory: a FedHelp
round's aggregate (trained on real chest X-rays) becomes the next student, a teacher is distilled into one,
and each is a signed bundle the edge verifies, with the federation, round and held-out metrics in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.signing import load_public_keys
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import RoundStart, RoundState
from hub.data.medmnist import load_medmnist
from hub.fl.strategy import ClientTask
from hub.models.registry import create_model
from hub.rounds.controller import RoundController
from hub.service.settings import HubSettings
from hub.store.artifacts import store_tensors
from hub.store.database import open_database
from hub.training.checkpoint import load_checkpoint
from hub.training.learners import to_params
from hub.training.node_learner import build_learner, clinic_data
from tests.hub.service.test_rounds import answer, enroll
from tests.support.student_checkpoint import pneumonia_checkpoint

pytestmark = pytest.mark.hub

HUB = Path(sys.executable).parent / "fedclinic-hub"
URL = "https://127.0.0.1:8443"


def _cli(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(HUB), *args, "--data-dir", str(data_dir)], capture_output=True, text=True, env=env, timeout=600
    )
    if check:
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def hub_with_round(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A hub whose round 1 (FedHelp, one large client on 128 real X-rays) is published; the student."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("students")
    data_dir = root / "hub-data"
    _cli(data_dir, "init", "--public-url", URL)
    torch.manual_seed(3)
    student = create_model("fedhelp_small")
    student_dir = pneumonia_checkpoint(root / "student", student, "fedhelp_small")
    start = to_params(student)
    db = open_database(f"sqlite:///{data_dir / 'hub.db'}")
    try:
        (node,) = enroll(db, 1)
        with db.session() as session:
            art = store_tensors(session, start)
        rc = RoundController(db, HubSettings(data_dir=data_dir))
        config = {"large_clients": node, "client.model": "fedhelp_small", "client.seed": 5}
        info = rc.start(
            RoundStart(strategy="fedhelp", config=config, model_artifact=art, deadline_s=600), actor="t"
        )
        (task,) = rc.open_tasks(node)
        images = load_medmnist("pneumoniamnist", "train")
        x = ((images.images[:128, None].astype(np.float32) / 255.0 - 0.5) / 0.25).astype(np.float32)
        y = images.labels[:128].astype(np.int64).reshape(-1)
        learner = build_learner(task.config, clinic_data(x, y), 5)
        sent = {k: v for k, v in start.items() if not k.startswith("public_head")}
        update = learner.fit(ClientTask(node, 1, UpdateKind.WEIGHTS_DELTA, sent, task.config)).update
        assert answer(rc, task, node, update, n=128)
        assert rc.info(info.round_id).state is RoundState.PUBLISHED
        aggregate = rc.result(info.round_id)
    finally:
        db.close()
    return data_dir, student_dir, aggregate


def _verified_manifest(data_dir: Path, bundle: Path) -> Any:
    keys = load_public_keys(data_dir / "keys" / "hub.pub")
    return verify_bundle(bundle, keys).manifest


def test_from_round_applies_the_aggregate_and_signs_a_student_with_its_provenance(
    hub_with_round: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    data_dir, student_dir, aggregate = hub_with_round
    out = tmp_path / "r1"
    done = _cli(
        data_dir, "models", "from-round", "1", "--student", str(student_dir), "--out", str(out),
        "--model-version", "1.1.0", "--no-int8", "--publish", "--format", "json",
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["tensors_applied"] == len(aggregate)
    assert report["publication_id"]
    manifest = _verified_manifest(data_dir, Path(report["bundle"]))
    prov = manifest.provenance
    assert (prov.federation, prov.round, prov.training) == (URL, 1, "federated:fedhelp")
    assert 0.5 < prov.metrics["val_auc"] <= 1.0 and "test_auc_fp32" in prov.metrics
    # The student now holds the round's tensors; what the round did not train (the public head) is unchanged.
    new = load_checkpoint(out / "checkpoint").model_state
    old = load_checkpoint(student_dir).model_state
    for name, arr in aggregate.items():
        np.testing.assert_array_equal(new[name].numpy(), arr)
    assert not torch.equal(new["private_head.weight"], old["private_head.weight"])
    assert torch.equal(new["public_head.weight"], old["public_head.weight"])
    listed = json.loads(_cli(data_dir, "models", "list", "--format", "json").stdout)
    assert [p["record"]["model_version"] for p in listed["publications"]] == ["1.1.0"]


def test_from_round_refuses_a_student_of_another_architecture(
    hub_with_round: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    data_dir, _, _ = hub_with_round
    other = pneumonia_checkpoint(
        tmp_path / "other", create_model("fl_cnn", norm="group"), "fl_cnn", norm="group"
    )
    done = _cli(
        data_dir, "models", "from-round", "1", "--student", str(other), "--out", str(tmp_path / "x"),
        "--model-version", "1.2.0", "--no-int8", check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "lacks" in done.stderr and "same model" in done.stderr
    assert not (tmp_path / "x" / "bundle").exists()
    missing = _cli(
        data_dir, "models", "from-round", "7", "--student", str(other), "--out", str(tmp_path / "y"),
        "--model-version", "1.2.0", check=False,
    )  # fmt: skip
    assert missing.returncode != 0 and "no round 7" in missing.stderr
    # --node takes a node's own personal part, which only a pFedNet round keeps.
    for node, said in (("nobody", "no node 'nobody'"), ("site-0", "keeps no part per node")):
        refused = _cli(
            data_dir, "models", "from-round", "1", "--node", node, "--student", str(other),
            "--out", str(tmp_path / "z"), "--model-version", "1.2.0", check=False,
        )  # fmt: skip
        assert refused.returncode != 0 and said in refused.stderr, refused.stderr
    # --kept-from names a kept_tensors round: what a strategy left at the nodes, not another aggregate.
    refused = _cli(
        data_dir, "models", "from-round", "1", "--kept-from", "1", "--student", str(other),
        "--out", str(tmp_path / "k"), "--model-version", "1.2.0", check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "names a kept_tensors round" in refused.stderr, refused.stderr


def test_distill_signs_a_compact_student_with_its_provenance(
    hub_with_round: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    data_dir, student_dir, _ = hub_with_round
    done = _cli(
        data_dir, "distill", "--teacher", str(student_dir), "--out", str(tmp_path / "d"),
        "--model-version", "2.0.0", "--epochs", "1", "--transfer-limit", "256", "--round", "1",
        "--no-int8", "--format", "json",
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["publication_id"] is None
    manifest = _verified_manifest(data_dir, Path(report["bundle"]))
    assert manifest.provenance.training == "distilled"
    assert (manifest.provenance.federation, manifest.provenance.round) == (URL, 1)
    assert "val_auc" in manifest.provenance.metrics
    assert load_checkpoint(tmp_path / "d" / "checkpoint").config.model_name == "fl_cnn"
