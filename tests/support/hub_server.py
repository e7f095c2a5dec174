"""A real hub for tests: an initialised data directory and ``fedclinic-hub serve`` as a child process.

The server speaks HTTPS on a random loopback port with the data directory's self-signed certificate;
``client()`` returns an httpx client that trusts exactly that certificate. ``kill(signal.SIGKILL)`` and
``start()`` again give the crash-and-restart the round tests need.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edge_node.protocol.wire import EnrollRequest, JoinCodeIssued, decode_join_code, node_authorization
from hub.service.datadir import init_data_dir, read_admin_token
from hub.service.settings import HubSettings, load_settings

__all__ = ["EnrolledNode", "HubServer", "free_port", "init_hub"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_hub(
    data_dir: Path, *, database_url: str | None = None, signing_key: Path | None = None
) -> HubSettings:
    """``fedclinic-hub init`` in-process; ``signing_key`` (a hub.key) is installed first when given."""
    if signing_key is not None:
        keys = data_dir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        target = keys / "hub.key"
        target.write_bytes(signing_key.read_bytes())
        os.chmod(target, 0o600)
        pub = signing_key.with_name("hub.pub")
        (keys / "hub.pub").write_bytes(pub.read_bytes())
    settings = load_settings(data_dir, database_url=database_url)
    init_data_dir(settings)
    return settings


@dataclass
class EnrolledNode:
    node_id: str
    secret: str
    cohort: str
    #: The hub's signing key as the enrollment answer gave it (what the node trusts from then on).
    hub_public_key_pem: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": node_authorization(self.node_id, self.secret)}


@dataclass
class HubServer:
    data_dir: Path
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def cert(self) -> Path:
        return self.data_dir / "tls" / "cert.pem"

    @property
    def admin_token(self) -> str:
        return read_admin_token(load_settings(self.data_dir))

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), timeout=30.0, **kwargs)

    def start(self, timeout: float = 90.0) -> None:
        self.log_path = self.data_dir / f"serve-{int(time.time() * 1000)}.log"
        env = {
            **os.environ,
            "FEDCLINIC_HUB_TICK_S": "0.2",
            "FEDCLINIC_HUB_AGGREGATION_LEASE_S": "3",
            **self.env,
        }
        cmd = [
            sys.executable,
            "-m",
            "hub.commands.serve",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"hub exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.get("/v1/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"hub did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace")[-4000:]
            if self.log_path and self.log_path.exists()
            else ""
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (uvicorn's workers too) and wait for it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def join_code(
        self, client: httpx.Client, name: str, cohort: str = "default", ttl_s: int = 3600
    ) -> JoinCodeIssued:
        r = client.post(
            "/v1/admin/nodes",
            json={"node_name": name, "cohort": cohort, "ttl_s": ttl_s},
            headers=self.admin_headers,
        )
        assert r.status_code == 201, r.text
        return JoinCodeIssued.model_validate(r.json())

    def enroll(self, client: httpx.Client, name: str, cohort: str = "default") -> EnrolledNode:
        issued = self.join_code(client, name, cohort)
        code = decode_join_code(issued.join_code)
        secret = secrets.token_urlsafe(32)
        body = EnrollRequest(join_secret=code.secret, credential=secret, edge_version="test")
        r = client.post("/v1/enroll", json=body.model_dump(mode="json"))
        assert r.status_code == 200, r.text
        answer = r.json()
        return EnrolledNode(
            node_id=answer["node_id"],
            secret=secret,
            cohort=cohort,
            hub_public_key_pem=answer["hub_public_key_pem"],
        )
