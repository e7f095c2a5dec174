"""Secure aggregation over the wire: a real hub over HTTPS on loopback and nodes running the node's own
protocol code (``SecureAggregationRound`` over the pinned ``HubTransport``), one thread per node.

Ten nodes, threshold six, three of them drop after masking (their masked inputs never reach the hub):
the sum the hub unmasks equals the plain sum of the seven survivors' inputs exactly in Z_2^32, so every
mask of the dropped nodes came off, and the round publishes their mean. A replayed, a forged and a
wrong-round message are refused with the reason (and recorded); below the threshold a round fails.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from edge_node.protection import ProtectionPipeline
from edge_node.protection.masking import SecAggClient
from edge_node.protocol.compression import layout_of
from edge_node.protocol.errors import SecAggError
from edge_node.protocol.protection import ProtectionSpec
from edge_node.protocol.secagg import MASKED_TENSOR, encode_fixed, flatten, public_raw
from edge_node.protocol.secagg_exchange import MASKED_MEDIA_TYPE, SecAggAdvertisement, pack_masked
from edge_node.protocol.tensors import Tensors, decode_tensors
from edge_node.protocol.wire import Task, TaskList
from edge_node.uplink.credential import BearerAuth
from edge_node.uplink.secure_aggregation import SecureAggregationRound
from edge_node.uplink.transport import HubTransport
from hub.service.settings import load_settings
from hub.store.artifacts import store_tensors
from hub.store.database import Database, open_database
from tests.hub.service.conftest import SERVICE_ENV, bundle_root, submission
from tests.support.hub_server import EnrolledNode, HubServer, init_hub
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.hub

START = {"w": np.zeros((40, 25), np.float32), "b": np.zeros(10, np.float32)}
LAYOUT = layout_of(START)
#: Long enough for ten threads on a loaded machine to answer a step; the dropped nodes cost one of it.
STEP_S = 8.0


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A hub on SQLite (one worker) and on PostgreSQL with two workers (their steps must agree)."""
    root = tmp_path_factory.mktemp(f"hub-secagg-{request.param}")
    url = None
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("pg")
        url = cluster.create_database(f"hub_{os.urandom(4).hex()}")
    init_hub(root, database_url=url, signing_key=bundle_root() / "keys" / "hub.key")
    server = HubServer(
        root,
        workers=2 if url else 1,
        env={**SERVICE_ENV, "FEDCLINIC_HUB_SECAGG_STEP_S": str(STEP_S)},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def db(hub: HubServer) -> Iterator[Database]:
    database = open_database(load_settings(hub.data_dir).db_url, migrate=False)
    yield database
    database.close()


def _transport(hub: HubServer, node: EnrolledNode) -> HubTransport:
    return HubTransport(hub.url, hub.cert.read_text(), auth=BearerAuth(node.headers["Authorization"]))


def _start(
    hub: HubServer, client: httpx.Client, db: Database, nodes: list[EnrolledNode], threshold: int
) -> dict[str, Any]:
    with db.session() as session:
        art = store_tensors(session, START)
    r = client.post(
        "/v1/admin/rounds",
        json={
            "strategy": "fedavg",
            "nodes": [n.node_id for n in nodes],
            "model_artifact": art,
            "deadline_s": 120,
            "protection": {"clip_norm": 1.0, "secure_aggregation": True, "secagg_threshold": threshold},
        },
        headers=hub.admin_headers,
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def _task(client: httpx.Client, node: EnrolledNode, round_id: str) -> Task:
    tasks = TaskList.model_validate(client.get("/v1/node/tasks", headers=node.headers).json()).tasks
    (task,) = [t for t in tasks if t.round_id == round_id]
    assert task.protection is not None and task.protection.secure_aggregation
    return task


def _round(hub: HubServer, client: httpx.Client, round_id: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/admin/rounds/{round_id}", headers=hub.admin_headers).json())


def _wait_end(hub: HubServer, client: httpx.Client, round_id: str, timeout: float = 60.0) -> dict[str, Any]:
    done = threading.Event()
    for _ in range(int(timeout / 0.2)):
        info = _round(hub, client, round_id)
        if info["state"] in ("published", "failed"):
            return info
        done.wait(0.2)
    raise AssertionError(f"round {round_id} did not end: {_round(hub, client, round_id)}\n{hub.log()}")


def _rows(db: Database, sql: str, value: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` with its one parameter ``:v`` bound to ``value``."""
    with db.session() as session:
        return [tuple(row) for row in session.execute(text(sql), {"v": value})]


def _ring(inputs: list[Tensors]) -> np.ndarray:
    total = np.zeros(sum(int(np.prod(s.shape)) for s in LAYOUT.values()), dtype=np.uint32)
    for t in inputs:
        total += encode_fixed(flatten(t, LAYOUT), 16)
    return total


def test_ten_nodes_three_drop_after_masking_and_the_hub_unmasks_the_exact_sum(
    hub: HubServer, db: Database
) -> None:
    spec = ProtectionSpec(cohort_size=10, clip_norm=1.0, secure_aggregation=True, secagg_threshold=6)
    with hub.client() as client:
        nodes = [hub.enroll(client, f"sa-{i:02d}") for i in range(10)]
        started = _start(hub, client, db, nodes, threshold=6)
        round_id = started["round_id"]
        tasks = {n.node_id: _task(client, n, round_id) for n in nodes}
    dropped = {nodes[2].node_id, nodes[5].node_id, nodes[9].node_id}
    inputs: dict[str, Tensors] = {}
    payloads: dict[str, bytes] = {}
    sessions: dict[str, SecureAggregationRound] = {}

    def run(node: EnrolledNode, seed: int) -> None:
        rng = np.random.default_rng(seed)
        update = {name: rng.normal(0, 0.02, s.shape).astype(np.float32) for name, s in LAYOUT.items()}
        with _transport(hub, node) as transport:
            sa = SecureAggregationRound.for_task(transport, node.node_id, tasks[node.node_id])
            sessions[node.node_id] = sa
            sa.advertise()
            sa.share()

            def masker(t: Mapping[str, np.ndarray]) -> Tensors:
                inputs[node.node_id] = dict(t)  # what this node masked: its clipped update
                return sa.client.mask(t)

            protected = ProtectionPipeline(rng=rng).protect(update, spec, masker=masker)
            payloads[node.node_id] = protected.payload
            if node.node_id in dropped:
                return  # masked, then gone: its input never reaches the hub
            sa.send_masked(protected)
            sa.unmask()

    with ThreadPoolExecutor(max_workers=10) as pool:
        for f in [pool.submit(run, n, i) for i, n in enumerate(nodes)]:
            f.result()
    with hub.client() as client:
        info = _wait_end(hub, client, round_id)
    assert info["state"] == "published", info["reason"]
    survivors = sorted(set(inputs) - dropped)
    assert len(survivors) == 7
    (ring_blob,) = _rows(
        db, "SELECT ring_sum FROM secagg_steps WHERE round_id = :v AND step = 'unmask'", round_id
    )
    got = decode_tensors(bytes(ring_blob[0]))["ring_sum"]
    # exactly the plain sum of the survivors in Z_2^32: the dropped nodes' pairwise masks all came off
    np.testing.assert_array_equal(got, _ring([inputs[n] for n in survivors]))
    stored = _rows(
        db, "SELECT node_id, payload FROM secagg_messages WHERE round_id = :v AND step = 'masked'", round_id
    )
    assert sorted(n for n, _ in stored) == survivors
    raw = np.zeros_like(got)
    for _, payload in stored:
        raw += decode_tensors(bytes(payload))[MASKED_TENSOR]
    assert not np.array_equal(raw, got)  # the masks did not cancel by themselves
    # the hub kept masked vectors and the sum, never an update
    assert _rows(db, "SELECT count(*) FROM updates WHERE round_id = :v", round_id) == [(0,)]
    # the published model: start (zeros) + the survivors' mean, to the ring's fixed-point step
    (blob,) = _rows(db, "SELECT data FROM artifacts WHERE id = :v", info["result_artifact"])
    result = decode_tensors(bytes(blob[0]))
    for name in LAYOUT:
        plain = np.mean([inputs[n][name].astype(np.float64) for n in survivors], axis=0)
        np.testing.assert_allclose(result[name], plain, atol=2**-16)
    sent = [sessions[n].bytes_sent for n in survivors]
    assert all(s > len(payloads[n]) for s, n in zip(sent, survivors, strict=True))


def _post(client: httpx.Client, node: EnrolledNode, round_id: str, step: str, body: str) -> httpx.Response:
    headers = {**node.headers, "Content-Type": "application/json"}
    return client.post(f"/v1/secagg/{round_id}/{step}", content=body, headers=headers)


def _refused(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    assert words in r.json()["reason"], r.text


def test_replayed_forged_and_wrong_round_messages_are_refused_and_recorded(
    hub: HubServer, db: Database
) -> None:
    with hub.client() as client:
        a, b, c = [hub.enroll(client, f"sx-{i}") for i in range(3)]
        first = _start(hub, client, db, [a, b, c], threshold=2)
        second = _start(hub, client, db, [a, b, c], threshold=2)
        r1, r2 = first["round_id"], second["round_id"]
        task_a = _task(client, a, r1)
        with _transport(hub, a) as transport:
            sa = SecureAggregationRound.for_task(transport, a.node_id, task_a)
            sa.long_poll_s = 0.0  # only advertise: do not wait for the roster
            sa.advertise()
        sent = SecAggAdvertisement(signing_public=sa.signing_public, message=sa.client.advertise())
        # replayed: the very message again (Ed25519 signatures are deterministic: byte for byte the same)
        _refused(_post(client, a, r1, "advertise", sent.model_dump_json()), 409, "(replay)")
        # forged: a's message sent with b's credential
        _refused(_post(client, b, r1, "advertise", sent.model_dump_json()), 403, "credential")
        # forged: b's message changed after signing, and b's message beside a key that did not sign it
        key_b = Ed25519PrivateKey.generate()
        client_b = SecAggClient(
            b.node_id, key_b, {b.node_id: key_b.public_key()}, task_id=r1, round=first["round"],
            threshold=2, layout=LAYOUT,
        )  # fmt: skip
        honest = client_b.advertise()
        tampered = honest.model_copy(update={"mask_public": "22" * 32})
        body = SecAggAdvertisement(signing_public=public_raw(key_b), message=tampered)
        _refused(_post(client, b, r1, "advertise", body.model_dump_json()), 403, "not signed")
        stranger = Ed25519PrivateKey.generate()
        body = SecAggAdvertisement(signing_public=public_raw(stranger), message=honest)
        _refused(_post(client, b, r1, "advertise", body.model_dump_json()), 403, "not signed")
        # wrong round: a's round-1 message posted to round 2, and relabelled as round 2 (signature breaks)
        _refused(_post(client, a, r2, "advertise", sent.model_dump_json()), 409, "bound to round")
        relabelled = sent.model_copy(
            update={"message": sent.message.model_copy(update={"task_id": r2, "round": second["round"]})}
        )
        _refused(_post(client, a, r2, "advertise", relabelled.model_dump_json()), 403, "not signed")
        # a plain update into a round under secure aggregation
        _refused(
            client.post(
                f"/v1/tasks/{task_a.task_id}/update",
                json=submission(
                    task_a, a.node_id, {k: np.zeros(s.shape, s.dtype) for k, s in LAYOUT.items()}
                ),
                headers=a.headers,
            ),
            422,
            "secure aggregation",
        )
        # b's honest message is still welcome: the refusals changed nothing
        body = SecAggAdvertisement(signing_public=public_raw(key_b), message=honest)
        assert _post(client, b, r1, "advertise", body.model_dump_json()).status_code == 200
        for round_id in (r1, r2):
            client.post(f"/v1/admin/rounds/{round_id}/cancel", headers=hub.admin_headers)
    refusals = _rows(
        db, "SELECT detail FROM audit_log WHERE action = 'secagg.refused' AND subject = :v", r1
    ) + _rows(db, "SELECT detail FROM audit_log WHERE action = 'secagg.refused' AND subject = :v", r2)
    assert len(refusals) == 6
    assert any("replay" in d for (d,) in refusals) and any("bound to round" in d for (d,) in refusals)


def test_a_post_that_waits_answers_with_its_step_relay_once_closed_and_refusals_are_unchanged(
    hub: HubServer, db: Database
) -> None:
    with hub.client() as client:
        nodes = [hub.enroll(client, f"sw-{i}") for i in range(3)]
        started = _start(hub, client, db, nodes, threshold=2)
        round_id = started["round_id"]
        keys = [Ed25519PrivateKey.generate() for _ in nodes]
        bodies = [
            SecAggAdvertisement(
                signing_public=public_raw(key),
                message=SecAggClient(
                    n.node_id, key, {n.node_id: key.public_key()}, task_id=round_id,
                    round=started["round"], threshold=2, layout=LAYOUT,
                ).advertise(),
            ).model_dump_json()
            for n, key in zip(nodes, keys, strict=True)
        ]  # fmt: skip

        def post(i: int, wait: float, body: str | None = None, as_node: int | None = None) -> httpx.Response:
            node = nodes[i if as_node is None else as_node]
            headers = {**node.headers, "Content-Type": "application/json"}
            url = f"/v1/secagg/{round_id}/advertise"
            return client.post(url, content=body or bodies[i], headers=headers, params={"wait": wait})

        # the step stays open past the wait: a plain receipt, no relay
        alone = post(0, 1.0)
        assert alone.status_code == 200, alone.text
        assert alone.json() == {"round_id": round_id, "node_id": nodes[0].node_id, "step": "advertise"}
        # refusals come at once, waiting or not: a replay, another node's credential
        _refused(post(0, 30.0), 409, "(replay)")
        _refused(post(1, 30.0, as_node=2), 403, "credential")
        # the two others: whoever is first waits for the other's message to close the step
        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = [f.result() for f in [pool.submit(post, i, 30.0) for i in (1, 2)]]
        roster = client.get(f"/v1/secagg/{round_id}/advertise", headers=nodes[1].headers).json()
        assert roster["ready"] and set(roster["signing_keys"]) == {n.node_id for n in nodes}
        for i, answer in zip((1, 2), answers, strict=True):
            assert answer.status_code == 200, answer.text
            receipt = answer.json()
            assert (receipt["node_id"], receipt["step"]) == (nodes[i].node_id, "advertise")
            assert receipt["relay"] == roster  # the relay a GET gets, as the POST's answer
        client.post(f"/v1/admin/rounds/{round_id}/cancel", headers=hub.admin_headers)


def test_masked_inputs_travel_binary_and_a_tampered_replayed_or_wrong_round_one_is_refused(
    hub: HubServer, db: Database
) -> None:
    spec = ProtectionSpec(cohort_size=3, clip_norm=1.0, secure_aggregation=True, secagg_threshold=2)
    with hub.client() as client:
        a, b, c = [hub.enroll(client, f"sm-{i}") for i in range(3)]
        first = _start(hub, client, db, [a, b, c], threshold=2)
        second = _start(hub, client, db, [a, b, c], threshold=2)
        r1, r2 = first["round_id"], second["round_id"]
        tasks = {n.node_id: _task(client, n, r1) for n in (a, b, c)}
    sessions: dict[str, SecureAggregationRound] = {}

    def run(node: EnrolledNode) -> None:
        transport = _transport(hub, node)
        sa = SecureAggregationRound.for_task(transport, node.node_id, tasks[node.node_id])
        sa.advertise()
        sa.share()
        sessions[node.node_id] = sa

    with ThreadPoolExecutor(max_workers=3) as pool:
        for f in [pool.submit(run, n) for n in (a, b, c)]:
            f.result()
    update = {name: np.full(s.shape, 0.01, np.float32) for name, s in LAYOUT.items()}
    sa = sessions[a.node_id]
    payload = sa.protect(update, spec, ProtectionPipeline(rng=np.random.default_rng(3))).payload
    body = pack_masked(sa.client.masked_input(payload), payload)
    binary = {"Content-Type": MASKED_MEDIA_TYPE}
    with hub.client() as client:

        def post(node: EnrolledNode, round_id: str, content: bytes, kind: dict[str, str]) -> httpx.Response:
            url = f"/v1/secagg/{round_id}/masked"
            return client.post(url, content=content, headers={**node.headers, **kind})

        # tampered: one byte of the payload changed after signing
        tampered = body[:-10] + bytes([body[-10] ^ 1]) + body[-9:]
        _refused(post(a, r1, tampered, binary), 422, "not the one it signed")
        # forged: a's body sent with b's credential
        _refused(post(b, r1, body, binary), 403, "credential")
        # wrong round: a's round-1 body posted to round 2
        _refused(post(a, r2, body, binary), 409, "bound to round")
        # not an envelope: a header naming more than the body holds, and JSON from an older node
        _refused(post(a, r1, b"\x00\x01\x00\x00{}", binary), 422, "header names")
        _refused(post(a, r1, b'{"message": {}}', {"Content-Type": "application/json"}), 422, "not JSON")
        assert post(a, r1, body, binary).status_code == 200
        # replayed: the very body again
        _refused(post(a, r1, body, binary), 409, "(replay)")
        for round_id in (r1, r2):
            client.post(f"/v1/admin/rounds/{round_id}/cancel", headers=hub.admin_headers)
    for node in sessions.values():
        node.transport.close()
    stored = _rows(
        db, "SELECT node_id, payload FROM secagg_messages WHERE round_id = :v AND step = 'masked'", r1
    )
    assert [(n, bytes(p)) for n, p in stored] == [(a.node_id, payload)]  # exactly the signed payload
    refusals = _rows(db, "SELECT detail FROM audit_log WHERE action = 'secagg.refused' AND subject = :v", r1)
    # the envelope-level refusals (not an envelope, JSON) never reach the protocol, so they are not audited
    assert sum("masked:" in d for (d,) in refusals) == 3


def test_a_step_below_the_threshold_fails_the_round_with_the_reason(hub: HubServer, db: Database) -> None:
    with hub.client() as client:
        nodes = [hub.enroll(client, f"st-{i}") for i in range(3)]
        started = _start(hub, client, db, nodes, threshold=3)
        tasks = {n.node_id: _task(client, n, started["round_id"]) for n in nodes}
    errors: list[str] = []

    def run(node: EnrolledNode, shares: bool) -> None:
        with _transport(hub, node) as transport:
            sa = SecureAggregationRound.for_task(transport, node.node_id, tasks[node.node_id])
            sa.advertise()
            if not shares:
                return  # gone after advertising: the share step closes with 2 of 3
            try:
                sa.share()
            except SecAggError as exc:
                errors.append(str(exc))

    with ThreadPoolExecutor(max_workers=3) as pool:
        for f in [pool.submit(run, n, i > 0) for i, n in enumerate(nodes)]:
            f.result()
    with hub.client() as client:
        info = _wait_end(hub, client, started["round_id"])
    assert info["state"] == "failed"
    assert "2 nodes sent their share message; the threshold is 3" in info["reason"]
    assert len(errors) == 2 and all("the threshold is 3" in e for e in errors)
