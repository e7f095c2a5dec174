"""Secure aggregation with real nodes: three ``fedclinic-edge serve`` processes and a real hub over HTTPS.

The hub starts a ``public_logits`` round with ``--secagg``; each node's sync loop takes its task through the
protocol's four steps over the API (advertise, share, masked, unmask) and its masked logits never leave as a
plain update. The hub unmasks only the sum, and the round's aggregate is the nodes' mean logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_node.protocol.tensors import decode_tensors, encode_tensors
from hub.data.medmnist import load_medmnist
from tests.e2e.federation import make_hub, public_logits_of, start_serving, wait_for
from tests.edge_node.conftest import EdgeProcess, find_test_bundle

pytestmark = pytest.mark.slow

NAMES = ("clinic-north", "clinic-south", "clinic-east")
ANCHORS = 128


@pytest.mark.timeout(600)
def test_three_serving_nodes_answer_a_secure_aggregation_round(tmp_path: Path, shared_data: Path) -> None:
    found = find_test_bundle()
    assert found is not None, (
        "needs the test bundle: python -m tests.support.bundle DIR, FEDCLINIC_TEST_BUNDLE"
    )
    images = load_medmnist("pneumoniamnist", "test", shared_data).images[:ANCHORS]
    inputs = (images.astype(np.float32) / 255.0)[:, None, :, :]  # (N, 1, 28, 28)
    anchors = tmp_path / "anchors.npz"
    anchors.write_bytes(encode_tensors({"inputs": inputs}))
    logits = public_logits_of(found.bundle / "model.onnx", inputs)  # (N, 2)

    hub = make_hub(tmp_path / "hub", extra_env={"FEDCLINIC_HUB_SECAGG_STEP_S": "30"})
    hub.start()
    nodes: dict[str, EdgeProcess] = {}
    try:
        start_serving(nodes, tmp_path, hub, NAMES, found.bundle, found.public_key)
        started = hub.cli_json(
            "rounds", "start", "--strategy", "public_logits", "--model", str(anchors),
            "--config", "num_classes=2", "--secagg", "--clip", "1000", "-k", "3", "--deadline", "180",
        )  # fmt: skip
        assert started["protection"]["secure_aggregation"] is True
        done = wait_for(
            "the secure-aggregation round to end",
            lambda: (
                (r := dict(hub.admin_call("GET", f"/v1/admin/rounds/{started['round_id']}")))["state"]
                in ("published", "failed")
                and r
            ),
            timeout=180,
        )
        assert done["state"] == "published", done.get("reason")
        # The hub kept three masked vectors and the sum, never a plain update.
        assert hub.query("SELECT count(*) FROM updates") == [(0,)]
        masked = hub.query(
            "SELECT count(*) FROM secagg_messages WHERE round_id = :r AND step = 'masked'",
            {"r": started["round_id"]},
        )
        assert masked == [(3,)]
        (blob,) = hub.query("SELECT data FROM artifacts WHERE id = :a", {"a": done["result_artifact"]})[0]
        aggregate = decode_tensors(bytes(blob))["logits"]
        # every node scored the same anchors with the same model: the mean is their logits, to the ring's
        # fixed-point step (2^-16 per node)
        np.testing.assert_allclose(aggregate, logits, atol=3 * 2**-16)
    finally:
        for node in nodes.values():
            if node.alive():
                node.stop()
        hub.stop()
