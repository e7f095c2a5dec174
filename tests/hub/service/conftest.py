"""Fixtures for the hub service: real hub processes over HTTPS on loopback, SQLite or PostgreSQL."""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import Task, UpdateSubmission
from hub.fl.codec import encode_result
from hub.fl.strategy import ClientResult
from hub.rounds.controller import RoundController
from hub.service.settings import HubSettings
from hub.store.database import Database, open_database
from tests.support.hub_server import HubServer, init_hub
from tests.support.postgres import PostgresCluster, find_pg_bin, postgres_cluster

pytestmark = pytest.mark.hub

#: Small caps so that "over the cap" and "compression bomb" cases stay cheap to build.
SERVICE_ENV = {
    "FEDCLINIC_HUB_MAX_UPDATE_BYTES": str(1024 * 1024),
    "FEDCLINIC_HUB_MAX_UNPACKED_BYTES": str(8 * 1024 * 1024),
}


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    """An in-process hub store on SQLite (the round controller's tests)."""
    database = open_database(f"sqlite:///{tmp_path / 'hub.db'}")
    yield database
    database.close()


@pytest.fixture()
def settings(tmp_path: Path) -> HubSettings:
    return HubSettings(data_dir=tmp_path, aggregation_lease_s=5)


@pytest.fixture()
def rc(db: Database, settings: HubSettings) -> RoundController:
    return RoundController(db, settings)


def hub_data_dir(data: Path) -> dict[str, str]:
    """A hub data directory made by ``fedclinic-hub init`` around the test bundle's signing key; the
    environment that points the CLI at it."""
    from tests.hub.service.test_cli import run_json

    (data / "keys").mkdir(parents=True)
    for name in ("hub.key", "hub.pub"):
        shutil.copy(bundle_root() / "keys" / name, data / "keys" / name)
    os.chmod(data / "keys" / "hub.key", 0o600)
    env = {"FEDCLINIC_HUB_DATA_DIR": str(data)}
    run_json("init", "--public-url", "https://127.0.0.1:9443", env=env)
    return env


def bundle_root() -> Path:
    root = Path(os.environ.get("FEDCLINIC_TEST_BUNDLE", "build/test-bundle"))
    if not (root / "bundle" / "manifest.sig").is_file():
        pytest.fail(f"no signed test bundle at {root}: run `make test-bundle` or set FEDCLINIC_TEST_BUNDLE")
    return root


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    if find_pg_bin() is None:
        pytest.fail(
            "PostgreSQL binaries missing: apt-get install postgresql (see the Makefile's system target)"
        )
    with postgres_cluster() as cluster:
        yield cluster


def start_hub(root: Path, *, database_url: str | None = None, workers: int = 1) -> HubServer:
    """Initialise a data directory (with the test bundle's signing key) and serve it."""
    init_hub(root, database_url=database_url, signing_key=bundle_root() / "keys" / "hub.key")
    server = HubServer(root, workers=workers, env=SERVICE_ENV)
    server.start()
    return server


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def any_hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A hub on SQLite (one worker) and a hub on PostgreSQL with two workers."""
    root = tmp_path_factory.mktemp(f"hub-{request.param}")
    if request.param == "sqlite":
        server = start_hub(root)
    else:
        cluster: PostgresCluster = request.getfixturevalue("pg")
        url = cluster.create_database(f"hub_{os.urandom(4).hex()}")
        server = start_hub(root, database_url=url, workers=2)
    try:
        yield server
    finally:
        server.stop()


def submission(
    task: Task, node_id: str, update: dict[str, np.ndarray], *, num_examples: int = 10, rnd: int | None = None
) -> dict[str, object]:
    """The JSON body of an update for ``task`` (``rnd`` overrides the round the envelope claims)."""
    result = ClientResult(node_id, task.round if rnd is None else rnd, num_examples, update, {"loss": 0.5})
    envelope, payload = encode_result(result, UpdateKind(task.kind))
    body = UpdateSubmission(
        task_id=task.task_id, envelope=envelope, payload_b64=base64.b64encode(payload).decode()
    )
    return body.model_dump(mode="json")


def zeros_update(task: Task, value: float = 0.0) -> dict[str, np.ndarray]:
    """An update of exactly the expected names, shapes and dtypes, filled with ``value``."""
    return {t.name: np.full(t.shape, value, dtype=np.dtype(t.dtype)) for t in task.expected}
