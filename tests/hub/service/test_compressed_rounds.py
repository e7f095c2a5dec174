"""Compressed rounds at the hub: the intake decodes top-k / int8 / fp16 wire tensors with the protocol's
codecs, checks and aggregates the dense update, and refuses a payload that is not the round's encoding."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from edge_node.protocol.compression import layout_of
from edge_node.protocol.protection import CompressionKind, compressor_for
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import RoundProtection, RoundStart, RoundState, UpdateSubmission
from hub.fl.codec import encode_result
from hub.fl.strategy import ClientResult
from hub.rounds.controller import RoundController
from hub.service.errors import UpdateRejected
from hub.service.settings import HubSettings
from hub.store.artifacts import store_tensors
from hub.store.database import Database
from tests.hub.service.test_rounds import answer, enroll

pytestmark = pytest.mark.hub


def _logits_round(db: Database, rc: RoundController, protection: RoundProtection, n: int) -> str:
    inputs = np.random.default_rng(0).normal(size=(40, 1, 28, 28)).astype(np.float32)  # (N, C, H, W)
    with db.session() as session:
        art = store_tensors(session, {"inputs": inputs})
    info = rc.start(
        RoundStart(
            strategy="public_logits", config={"num_classes": 2}, model_artifact=art, protection=protection
        ),
        actor="t",
    )
    assert info.protection == protection and len(info.nodes) == n
    return info.round_id


@pytest.mark.parametrize("kind", [CompressionKind.TOPK, CompressionKind.INT8, CompressionKind.FP16])
def test_a_compressed_round_aggregates_what_the_nodes_encoded(
    db: Database, rc: RoundController, kind: CompressionKind
) -> None:
    nodes = enroll(db, 3)
    protection = RoundProtection(compression=kind, topk_fraction=0.1)
    round_id = _logits_round(db, rc, protection, 3)
    rng = np.random.default_rng(1)
    codec = compressor_for(kind, 0.1)
    assert codec is not None
    sent = []
    for node in nodes:
        (task,) = rc.open_tasks(node)
        assert task.protection is not None and task.protection.compression is kind
        logits = {"logits": rng.normal(size=(40, 2)).astype(np.float32)}  # (N, classes)
        wire = codec.compress(logits)
        assert answer(rc, task, node, wire)
        sent.append(codec.decompress(wire, layout_of(logits))["logits"].astype(np.float64))
    assert rc.info(round_id).state is RoundState.PUBLISHED
    expected = np.mean(sent, axis=0)  # every node weighted 1: the mean of what the wire carried
    np.testing.assert_allclose(rc.result(round_id)["logits"], expected, rtol=1e-6, atol=1e-6)


def test_a_compressed_round_refuses_a_dense_or_malformed_payload(db: Database, rc: RoundController) -> None:
    nodes = enroll(db, 3)
    round_id = _logits_round(db, rc, RoundProtection(compression=CompressionKind.TOPK), 3)
    (task,) = rc.open_tasks(nodes[0])
    dense = {"logits": np.ones((40, 2), np.float32)}
    with pytest.raises(UpdateRejected, match="lacks 'logits::idx'"):
        answer(rc, task, nodes[0], dense)
    bad = {"logits::idx": np.array([5, 80], np.int32), "logits::val": np.ones(2, np.float32)}
    with pytest.raises(UpdateRejected, match="out of range"):
        answer(rc, task, nodes[0], bad)
    # Nothing was kept: the node can still send its right answer.
    assert rc.info(round_id).accepted == 0
    good = compressor_for(CompressionKind.TOPK, 0.01)
    assert good is not None
    assert answer(rc, task, nodes[0], good.compress(dense))


def test_a_compressed_update_decoded_from_the_store_matches(db: Database, tmp_path: Path) -> None:
    """An update accepted by one process and aggregated by another is decoded from the store the same way."""
    nodes = enroll(db, 2)
    settings = HubSettings(data_dir=tmp_path, aggregation_lease_s=5)
    taker = RoundController(db, settings)
    round_id = _logits_round(db, taker, RoundProtection(compression=CompressionKind.INT8), 2)
    codec = compressor_for(CompressionKind.INT8)
    assert codec is not None
    values = [np.full((40, 2), 1.0, np.float32), np.full((40, 2), 3.0, np.float32)]
    for node, value in zip(nodes, values, strict=True):
        (task,) = taker.open_tasks(node)
        envelope, payload = encode_result(
            ClientResult(node, task.round, 1, codec.compress({"logits": value})), UpdateKind.PUBLIC_LOGITS
        )
        body = UpdateSubmission(
            task_id=task.task_id, envelope=envelope, payload_b64=base64.b64encode(payload).decode()
        )
        taker.intake.accept(node, task.task_id, body)  # stored; this process never aggregates
    closer = RoundController(db, settings)
    closer.closer.close_round(round_id)
    np.testing.assert_allclose(closer.result(round_id)["logits"], np.full((40, 2), 2.0), rtol=1e-6)
