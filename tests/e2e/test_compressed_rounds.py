"""Compressed rounds over the wire: real ``fedclinic-edge serve`` nodes and a real hub over HTTPS on loopback.

The hub starts a ``public_logits`` round with ``--compression topk``; each node's protection pipeline sends
the top-k wire tensors of its logits, keeping what top-k dropped as an error-feedback residual in its data
directory; the hub's intake decodes them and the round's aggregate is the mean of what the wire carried.
The nodes restart between two rounds, and the second round's aggregate shows the residual carried over.
The bytes ``fedclinic-edge updates`` reports are the bytes the hub stored; the hub's update cap sits between
the dense and the compressed size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_node.protocol.compression import ErrorFeedback, TopKCompressor, layout_of
from edge_node.protocol.tensors import decode_tensors, encode_tensors
from hub.data.medmnist import load_medmnist
from tests.e2e.federation import HubProcess, make_hub, public_logits_of, start_serving, wait_for
from tests.edge_node.conftest import EdgeProcess, find_test_bundle

pytestmark = pytest.mark.slow

NAMES = ("clinic-north", "clinic-south", "clinic-east")
#: Public anchors scored by every node: real PneumoniaMNIST test images.
ANCHORS = 256
FRACTION = 0.05


def _round(hub: HubProcess, round_id: str) -> dict[str, Any]:
    return dict(hub.admin_call("GET", f"/v1/admin/rounds/{round_id}"))


def _run_round(hub: HubProcess, anchors: Path) -> dict[str, Any]:
    started = hub.cli_json(
        "rounds", "start", "--strategy", "public_logits", "--model", str(anchors),
        "--config", "num_classes=2", "--compression", "topk", "--topk-fraction", str(FRACTION),
        "-k", "3", "--deadline", "120",
    )  # fmt: skip
    assert started["protection"]["compression"] == "topk"
    assert started["protection"]["topk_fraction"] == FRACTION
    return wait_for(
        "the compressed round to end",
        lambda: (r := _round(hub, started["round_id"]))["state"] in ("published", "failed") and r,
        timeout=120,
    )


def _aggregate(hub: HubProcess, done: dict[str, Any]) -> np.ndarray:
    (blob,) = hub.query("SELECT data FROM artifacts WHERE id = :a", {"a": done["result_artifact"]})[0]
    return decode_tensors(bytes(blob))["logits"]


@pytest.mark.timeout(900)
def test_topk_rounds_travel_compressed_and_the_residual_survives_a_node_restart(
    tmp_path: Path, shared_data: Path
) -> None:
    found = find_test_bundle()
    assert found is not None, (
        "needs the test bundle: python -m tests.support.bundle DIR, FEDCLINIC_TEST_BUNDLE"
    )
    images = load_medmnist("pneumoniamnist", "test", shared_data).images[:ANCHORS]
    inputs = (images.astype(np.float32) / 255.0)[:, None, :, :]  # (N, 1, 28, 28)
    anchors = tmp_path / "anchors.npz"
    anchors.write_bytes(encode_tensors({"inputs": inputs}))
    logits = public_logits_of(found.bundle / "model.onnx", inputs)  # (N, 2)

    # The hub's smallest cap on an update: the dense logits are over it, their top-k wire tensors are not,
    # so the round also shows that a node checks the cap on what it sends, not on what it computed.
    cap = 1024
    assert len(encode_tensors({"logits": logits})) > cap
    hub = make_hub(tmp_path / "hub", extra_env={"FEDCLINIC_HUB_MAX_UPDATE_BYTES": str(cap)})
    hub.start()
    nodes: dict[str, EdgeProcess] = {}
    try:
        start_serving(nodes, tmp_path, hub, NAMES, found.bundle, found.public_key)

        # What the nodes send, computed here with the protocol's codec and an in-memory error feedback.
        feedback = ErrorFeedback(TopKCompressor(FRACTION))
        codec, layout = TopKCompressor(FRACTION), layout_of({"logits": logits})
        expected = [
            codec.decompress(feedback.compress({"logits": logits}), layout)["logits"] for _ in range(2)
        ]
        assert not np.allclose(expected[0], expected[1])  # the second round carries the first's residual

        first = _run_round(hub, anchors)
        assert first["state"] == "published" and first["accepted"] == 3, first
        np.testing.assert_allclose(_aggregate(hub, first), expected[0], rtol=1e-5, atol=1e-5)

        # Every node restarts: only the residual file in its data directory remembers what top-k dropped.
        for node in nodes.values():
            assert (node.data_dir / "compression-residuals" / f"topk-{FRACTION:g}.npz").is_file()
            node.stop()
            node.start()
        second = _run_round(hub, anchors)
        assert second["state"] == "published" and second["accepted"] == 3, second
        np.testing.assert_allclose(_aggregate(hub, second), expected[1], rtol=1e-5, atol=1e-5)

        # Bytes on the wire: measured from the payload the hub stored; `fedclinic-edge updates` says the same.
        stored = {
            (str(node_id), str(round_id)): int(size)
            for node_id, round_id, size in hub.query("SELECT node_id, round_id, length(payload) FROM updates")
        }
        ids = {name: info["node_id"] for name, info in hub.nodes().items()}
        dense = len(encode_tensors({"logits": logits}))
        for name, node in nodes.items():
            shown = node.cli("updates", "--format", "json")
            assert shown.returncode == 0, shown.stderr
            rows = json.loads(shown.stdout)["updates"]
            assert [r["round"] for r in rows] == [first["round"], second["round"]]
            for row, done in zip(rows, (first, second), strict=True):
                assert row["payload_bytes"] == stored[(ids[name], done["round_id"])]
                # 26 of 512 logits with their int32 indices: measured 590 bytes against 1,179 for the
                # dense npz (whose zero column deflates well); npz headers weigh most at this size.
                assert row["payload_bytes"] < dense, (row["payload_bytes"], dense)
    finally:
        for node in nodes.values():
            if node.alive():
                node.stop()
        hub.stop()
