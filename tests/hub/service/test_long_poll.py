"""Idle nodes long-poll for tasks: the answer comes when a round starts, not at the next poll."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from edge_node.protocol.wire import RoundStart, TaskList
from hub.rounds.controller import RoundController
from hub.service.settings import load_settings
from hub.store.database import open_database
from tests.hub.service.conftest import start_hub
from tests.support.hub_server import HubServer

pytestmark = [pytest.mark.hub, pytest.mark.slow]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = start_hub(tmp_path_factory.mktemp("hub-longpoll"))
    try:
        yield server
    finally:
        server.stop()


def test_a_waiting_node_gets_its_task_as_soon_as_a_round_starts(hub: HubServer) -> None:
    with hub.client() as client:
        node = hub.enroll(client, "poller")
        t0 = time.monotonic()
        r = client.get("/v1/node/tasks", params={"wait": 1.5}, headers=node.headers)
        assert r.status_code == 200 and r.json() == {"tasks": []}
        assert time.monotonic() - t0 >= 1.4  # nothing to do: the hub held the request instead of answering

        def start_via_api() -> None:
            time.sleep(1.0)
            body = {"strategy": "stats", "config": {"num_classes": 2}, "deadline_s": 600}
            client_b = hub.client()
            with client_b:
                assert (
                    client_b.post("/v1/admin/rounds", json=body, headers=hub.admin_headers).status_code == 201
                )

        starter = threading.Thread(target=start_via_api)
        t0 = time.monotonic()
        starter.start()
        r = client.get("/v1/node/tasks", params={"wait": 20}, headers=node.headers)
        waited = time.monotonic() - t0
        starter.join()
        assert len(TaskList.model_validate(r.json()).tasks) == 1
        assert 0.9 <= waited < 5, waited

        # A round started by another process (the CLI writes the store directly) wakes waiters via the ticker.
        settings = load_settings(hub.data_dir)
        db = open_database(settings.db_url, migrate=False)
        try:
            (task,) = TaskList.model_validate(r.json()).tasks
            RoundController(db, settings).cancel(task.round_id, actor="test")

            def start_via_store() -> None:
                time.sleep(1.0)
                RoundController(db, settings).start(
                    RoundStart(strategy="stats", config={"num_classes": 2}, deadline_s=600), actor="test"
                )

            starter = threading.Thread(target=start_via_store)
            t0 = time.monotonic()
            starter.start()
            r = client.get("/v1/node/tasks", params={"wait": 20}, headers=node.headers)
            waited = time.monotonic() - t0
            starter.join()
            assert len(TaskList.model_validate(r.json()).tasks) == 1
            assert 0.9 <= waited < 5, waited
        finally:
            db.close()
