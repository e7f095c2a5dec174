"""Rounds over real HTTPS: k of n at the deadline; kill -9 mid-round with each update counted once."""

from __future__ import annotations

import signal
import time

import httpx
import numpy as np
import pytest

from edge_node.protocol.wire import RoundInfo, Task, TaskList
from hub.rounds.controller import RoundController
from hub.service.settings import load_settings
from hub.store.artifacts import store_tensors
from hub.store.database import open_database
from tests.hub.service.conftest import submission
from tests.support.hub_server import EnrolledNode, HubServer

pytestmark = [pytest.mark.hub, pytest.mark.slow]

RNG = np.random.default_rng(7)
START = {"conv.weight": RNG.normal(size=(4, 1, 3, 3)).astype(np.float32), "fc.bias": np.zeros(3, np.float32)}


def _tasks(client: httpx.Client, node: EnrolledNode) -> list[Task]:
    r = client.get("/v1/node/tasks", headers=node.headers)
    assert r.status_code == 200, r.text
    return TaskList.model_validate(r.json()).tasks


def _start(client: httpx.Client, server: HubServer, **body: object) -> RoundInfo:
    r = client.post("/v1/admin/rounds", json=body, headers=server.admin_headers)
    assert r.status_code == 201, r.text
    return RoundInfo.model_validate(r.json())


def _wait_round(client: httpx.Client, server: HubServer, round_id: str, timeout: float = 90) -> RoundInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = RoundInfo.model_validate(
            client.get(f"/v1/admin/rounds/{round_id}", headers=server.admin_headers).json()
        )
        if info.state.value in ("published", "failed"):
            return info
        time.sleep(0.3)
    raise AssertionError(f"round {round_id} did not finish: {info}")


def _fedavg(deltas: list[dict[str, np.ndarray]], counts: list[int]) -> dict[str, np.ndarray]:
    total = sum(counts)
    return {
        name: (
            START[name].astype(np.float64)
            + sum(n * d[name].astype(np.float64) for d, n in zip(deltas, counts, strict=True)) / total
        ).astype(np.float32)
        for name in START
    }


def test_round_closes_at_k_of_n_and_survives_kill_9(any_hub: HubServer) -> None:
    server = any_hub
    settings = load_settings(server.data_dir)
    db = open_database(settings.db_url, migrate=False)
    try:
        with db.session() as session:
            artifact = store_tensors(session, START)
        with server.client() as client:
            nodes = [server.enroll(client, f"crash-{i}-{server.port}") for i in range(3)]
            ids = [n.node_id for n in nodes]

            # Round A: one node drops out; the round closes at its deadline with k = 2 of 3.
            info = _start(
                client,
                server,
                strategy="fedavg",
                nodes=ids,
                min_results=2,
                deadline_s=6,
                model_artifact=artifact,
            )
            deltas, counts = [], []
            for i, node in enumerate(nodes[:2]):
                (task,) = _tasks(client, node)
                delta = {k: RNG.normal(scale=0.1, size=v.shape).astype(v.dtype) for k, v in START.items()}
                r = client.post(
                    f"/v1/tasks/{task.task_id}/update",
                    json=submission(task, node.node_id, delta, num_examples=10 * (i + 1)),
                    headers=node.headers,
                )
                assert r.status_code == 200, r.text
                deltas.append(delta)
                counts.append(10 * (i + 1))
            done = _wait_round(client, server, info.round_id)
            assert done.state.value == "published", done.reason
            assert (done.accepted, done.missing) == (2, 1)
            result = RoundController(db, settings).result(done.round_id)
            for name, expected in _fedavg(deltas, counts).items():
                np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-7)

            # Round B: kill -9 after the first update, restart, the first node's outbox resends it.
            info = _start(
                client,
                server,
                strategy="fedavg",
                nodes=ids,
                min_results=3,
                deadline_s=600,
                model_artifact=artifact,
            )
            tasks = {n.node_id: _tasks(client, n)[0] for n in nodes}
            deltas = [
                {k: RNG.normal(scale=0.1, size=v.shape).astype(v.dtype) for k, v in START.items()}
                for _ in nodes
            ]
            bodies = [
                submission(tasks[n.node_id], n.node_id, d, num_examples=5 + i)
                for i, (n, d) in enumerate(zip(nodes, deltas, strict=True))
            ]
            first = client.post(
                f"/v1/tasks/{tasks[ids[0]].task_id}/update", json=bodies[0], headers=nodes[0].headers
            )
            assert first.status_code == 200 and first.json()["first_time"] is True
        server.kill(signal.SIGKILL)
        server.start()
        with server.client() as client:
            again = client.post(
                f"/v1/tasks/{tasks[ids[0]].task_id}/update", json=bodies[0], headers=nodes[0].headers
            )
            assert again.status_code == 200 and again.json()["first_time"] is False, again.text
            for node, body in zip(nodes[1:], bodies[1:], strict=True):
                r = client.post(
                    f"/v1/tasks/{tasks[node.node_id].task_id}/update", json=body, headers=node.headers
                )
                assert r.status_code == 200, r.text
            done = _wait_round(client, server, info.round_id)
        assert done.state.value == "published", done.reason
        assert (done.accepted, done.missing) == (3, 0)
        result = RoundController(db, settings).result(done.round_id)
        for name, expected in _fedavg(deltas, [5, 6, 7]).items():
            np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-7)
    finally:
        db.close()
