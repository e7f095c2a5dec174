"""A federation on loopback for the e2e tests: a real ``fedclinic-hub serve`` over HTTPS and real
``fedclinic-edge serve`` nodes that enrolled with join codes, plus the helpers to watch them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, text

from edge_node.protocol.manifest import Manifest
from edge_node.uplink.transport import pinned_context
from tests.edge_node.conftest import TEST_SPOOL_RESERVE_BYTES, EdgeProcess, free_port, write_config
from tests.support.postgres import PostgresCluster

HUB_BIN = Path(sys.executable).parent / "fedclinic-hub"
T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | Literal[False] | None], timeout: float = 60.0, every: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds.

    A probe may answer ``cond and value``: False (or None) until it holds, then the value."""
    deadline = time.time() + timeout
    last: T | Literal[False] | None = None
    while time.time() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@dataclass
class HubProcess:
    """``fedclinic-hub serve`` in its own data directory; restartable, killable with SIGKILL."""

    root: Path
    port: int
    env: dict[str, str]
    workers: int = 1
    #: None: the default SQLite store in the data directory; else a PostgreSQL URL.
    database_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "hub-data"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(HUB_BIN), *args, "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"fedclinic-hub {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--format", "json").stdout)

    def init(self) -> None:
        extra = ["--database-url", self.database_url] if self.database_url else []
        self.cli("init", "--public-url", self.url, *extra)

    def start(self, timeout: float = 180.0) -> None:
        # Generous: two API workers each import the hub on a 2-core machine that other tests keep busy.
        log_path = self.root / f"hub-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(HUB_BIN),
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                stdout=log,
                stderr=log,
                env=self.env,
                start_new_session=True,  # kill9 takes the uvicorn workers down with it
            )

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"hub exited:\n{self.log_text()[-4000:]}")
            try:
                return self.admin().get("/v1/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the hub to answer /v1/health", healthy, timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    @property
    def cert_pem(self) -> str:
        return (self.data_dir / "tls" / "cert.pem").read_text()

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def signing_key(self) -> Ed25519PrivateKey:
        key = serialization.load_pem_private_key((self.data_dir / "keys" / "hub.key").read_bytes(), None)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def admin(self) -> httpx.Client:
        """An admin API client that trusts only this hub's certificate."""
        return httpx.Client(
            base_url=self.url,
            verify=pinned_context(self.cert_pem),
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )

    def round_ended(self, round_id: str, timeout: float) -> dict[str, Any]:
        """The round's admin view once it is published or failed (waiting up to ``timeout`` seconds)."""
        done = wait_for(
            f"round {round_id} to end",
            lambda: (
                (r := self.admin_call("GET", f"/v1/admin/rounds/{round_id}"))["state"]
                in ("published", "failed")
                and r
            ),
            timeout=timeout,
            every=1.0,
        )
        return dict(done)

    def admin_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self.admin() as client:
            response = client.request(method, path, json=body)
        assert response.status_code in (200, 201), f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def join_code(self, name: str, *, cli: bool = False) -> str:
        """A join code from ``fedclinic-hub nodes enroll NAME --format json`` or the admin API (faster: the
        CLI is a new process of several seconds on a busy machine)."""
        if cli:
            return str(self.cli_json("nodes", "enroll", name)["join_code"])
        return str(self.admin_call("POST", "/v1/admin/nodes", {"node_name": name})["join_code"])

    def nodes(self, *, cli: bool = False) -> dict[str, dict[str, Any]]:
        """Nodes by name, from ``fedclinic-hub nodes list --format json`` or the admin API."""
        listed = self.cli_json("nodes", "list") if cli else self.admin_call("GET", "/v1/admin/nodes")
        rows = listed["nodes"] if isinstance(listed, dict) else listed
        return {n["node_name"]: n for n in rows}

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'hub.db'}"

    def query(self, sql: str, params: dict[str, object] | None = None) -> list[tuple[Any, ...]]:
        """Read the hub's store directly (SQLite or PostgreSQL), as an auditor would."""
        engine = create_engine(self.store_url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text(sql), params or {})]
        finally:
            engine.dispose()

    def execute(self, sql: str, params: dict[str, object] | None = None) -> None:
        """Write to the hub's store behind its back (what an attacker with store access could do)."""
        engine = create_engine(self.store_url)
        try:
            with engine.begin() as conn:
                conn.execute(text(sql), params or {})
        finally:
            engine.dispose()


@dataclass
class Federation:
    hub: HubProcess
    nodes: dict[str, EdgeProcess]

    def node_ids(self) -> dict[str, str]:
        return {name: info["node_id"] for name, info in self.hub.nodes().items()}


def make_hub(
    root: Path, *, database_url: str | None = None, workers: int = 1, extra_env: dict[str, str] | None = None
) -> HubProcess:
    root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDCLINIC_HUB_", "FEDCLINIC_EDGE_"))}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            # Short beats and ticks: the tests watch several of them go by.
            "FEDCLINIC_HUB_HEARTBEAT_INTERVAL_S": "1",
            "FEDCLINIC_HUB_TICK_S": "0.5",
            "FEDCLINIC_HUB_MAX_WAIT_S": "5",
        }
    )
    env.update(extra_env or {})
    hub = HubProcess(root=root, port=free_port(), env=env, workers=workers, database_url=database_url)
    hub.init()
    return hub


#: The stores every federation flow runs on: SQLite with one API worker, PostgreSQL with two.
STORES = ["sqlite", "postgres-2-workers"]


def hub_for_store(store: str, root: Path, request: Any) -> HubProcess:
    """A hub on ``store`` (one of STORES), initialised, not started; ``request`` is the fixture request
    (PostgreSQL comes from the session's ``pg_cluster`` fixture in tests/e2e/conftest.py)."""
    if store == "sqlite":
        return make_hub(root)
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database(f"fed_{os.urandom(4).hex()}")
    return make_hub(root, database_url=url, workers=2)


def make_node(root: Path, name: str, **settings: object) -> EdgeProcess:
    """An edge node's directory and config (not enrolled, not started)."""
    node_root = root / name
    node_root.mkdir(parents=True)
    port = free_port()
    values: dict[str, object] = {
        "ae_title": "EDGE",
        "port": port,
        "page_port": free_port(),
        "data_dir": str(node_root / "data"),
        "quiet_seconds": 2.0,
        "providers": ["CPUExecutionProvider"],
        "log_level": "INFO",
        "spool_reserve_bytes": TEST_SPOOL_RESERVE_BYTES,
    }
    values.update(settings)
    config = node_root / "edge.toml"
    write_config(config, **values)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDCLINIC_EDGE_", "FEDCLINIC_HUB_"))}
    env["OMP_NUM_THREADS"] = "1"
    return EdgeProcess(root=node_root, port=port, env=env, config=config)


def enroll(hub: HubProcess, node: EdgeProcess, name: str, *, cli: bool = False) -> None:
    code = hub.join_code(name, cli=cli)
    done = node.cli("enroll", code)
    assert done.returncode == 0, f"enroll {name} failed:\n{done.stdout}\n{done.stderr}"


def start_serving(
    nodes: dict[str, EdgeProcess],
    root: Path,
    hub: HubProcess,
    names: tuple[str, ...],
    bundle: Path,
    public_key: Path,
) -> None:
    """Nodes ``names`` install ``bundle``, enroll at ``hub`` and serve until each has sent a heartbeat.

    Each started node goes into ``nodes`` at once, so that the caller's cleanup stops it whatever fails next.
    """
    for name in names:
        node = make_node(root, name, trusted_keys=str(public_key))
        installed = node.cli("install-bundle", str(bundle))
        assert installed.returncode == 0, installed.stderr
        enroll(hub, node, name)
        node.start()
        nodes[name] = node
    wait_for("every heartbeat", lambda: all(n["last_heartbeat"] for n in hub.nodes().values()))


def public_logits_of(model: Path, inputs: np.ndarray) -> np.ndarray:
    """What a node answers to a public_logits task over ``inputs``: its ONNX model's sigmoid logit z as the
    two-class logits (0, z)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (z,) = session.run(["logits"], {"image": inputs})  # (N, 1)
    out = np.zeros((inputs.shape[0], 2), dtype=np.float32)  # (N, 2)
    out[:, 1] = z[:, 0]
    return out


def uplink_state(node: EdgeProcess) -> dict[str, Any]:
    path = node.data_dir / "uplink" / "state.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def active_model(node: EdgeProcess) -> tuple[str, str] | None:
    rows = node.query(
        "SELECT m.model_id, m.version FROM activations a JOIN models m ON m.id = a.model_row "
        "ORDER BY a.id DESC LIMIT 1"
    )
    return (str(rows[0][0]), str(rows[0][1])) if rows else None


def signed_bundle(
    source: Path,
    dest: Path,
    key: Ed25519PrivateKey,
    *,
    version: str,
    preprocessing: dict[str, Any] | None = None,
) -> Path:
    """A copy of the bundle at ``source`` as ``version``, signed with ``key`` (the hub's); ``preprocessing``
    replaces those fields of its preprocessing."""
    shutil.copytree(source, dest)
    manifest = Manifest.model_validate_json((dest / "manifest.json").read_bytes())
    update: dict[str, Any] = {"model_version": version}
    if preprocessing:
        update["preprocessing"] = manifest.preprocessing.model_copy(update=preprocessing)
    manifest = manifest.model_copy(update=update)
    data = manifest.canonical_bytes()
    (dest / "manifest.json").write_bytes(data)
    (dest / "manifest.sig").write_bytes(key.sign(data))
    return dest


def stop_all(federation: Federation) -> Iterator[None]:
    try:
        yield
    finally:
        for node in federation.nodes.values():
            if node.alive():
                node.stop()
        federation.hub.stop()
