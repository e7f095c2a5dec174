"""The demo's hub: ``fedclinic-hub init`` once, ``fedclinic-hub serve`` over HTTPS on loopback, and its CLI.

The demo drives the hub only as an operator would, through ``fedclinic-hub`` commands (``--format json``
where it reads an answer) and its public health endpoint; never through its database.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness.demo.orthanc import free_port

__all__ = ["HUB_BIN", "HubError", "HubService"]

HUB_BIN = Path(sys.executable).parent / "fedclinic-hub"


class HubError(RuntimeError):
    """A hub command failed or the service did not come up; the message carries its output."""


@dataclass
class HubService:
    """One hub data directory and its ``serve`` process (stop and start again for an outage)."""

    root: Path
    #: Seconds between node heartbeats; short, so nodes notice publications and rounds quickly.
    heartbeat_s: float = 2.0
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    starts: int = 0

    @property
    def data_dir(self) -> Path:
        return self.root / "hub-data"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "hub.log"

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDCLINIC_HUB_", "FEDCLINIC_EDGE_"))}
        env.update(
            {
                "OMP_NUM_THREADS": "1",
                "FEDCLINIC_HUB_HEARTBEAT_INTERVAL_S": str(self.heartbeat_s),
                "FEDCLINIC_HUB_TICK_S": "0.5",
                "FEDCLINIC_HUB_MAX_WAIT_S": "5",
            }
        )
        return env

    def cli(self, *args: str, timeout: float = 300.0) -> str:
        """Run ``fedclinic-hub ARGS --data-dir …``; returns stdout, HubError with the output on failure."""
        return self._run(*args, "--data-dir", str(self.data_dir), timeout=timeout)

    def export(self, checkpoint: Path, out: Path, version: str) -> dict[str, Any]:
        """``fedclinic-hub export``: ``checkpoint`` as a bundle signed with the hub's key (no int8 variant);
        returns the command's JSON report."""
        key = self.data_dir / "keys" / "hub.key"
        return dict(
            json.loads(
                self._run(
                    *("export", "--checkpoint", str(checkpoint), "--key", str(key), "--out", str(out)),
                    *("--model-version", version, "--no-int8", "--format", "json"),
                    timeout=600.0,
                )
            )
        )

    def _run(self, *args: str, timeout: float) -> str:
        done = subprocess.run(
            [str(HUB_BIN), *args],
            capture_output=True,
            text=True,
            env=self.env or self._environment(),
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise HubError(f"fedclinic-hub {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--format", "json"))

    def init(self) -> HubService:
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = self._environment()
        self.cli("init", "--public-url", self.url)
        return self

    def start(self, timeout: float = 120.0) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(str(HUB_BIN), "serve", "--data-dir", str(self.data_dir)),
                    *("--host", "127.0.0.1", "--port", str(self.port)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # stop() signals the server and its workers together
            )
        context = ssl.create_default_context(cafile=str(self.data_dir / "tls" / "cert.pem"))
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, verify=context, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise HubError(f"the hub exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get("/v1/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        self.stop()
        raise HubError(f"the hub did not answer /v1/health within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    # -- the operator's commands ----------------------------------------------------------------------------

    def join_code(self, name: str) -> str:
        return str(self.cli_json("nodes", "enroll", name)["join_code"])

    def node_ids(self) -> dict[str, str]:
        """Node id by node name (``fedclinic-hub nodes list --format json``)."""
        listed = self.cli_json("nodes", "list")
        rows = listed["nodes"] if isinstance(listed, dict) else listed
        return {str(n["node_name"]): str(n["node_id"]) for n in rows}

    def publish(self, bundle: Path) -> dict[str, Any]:
        return dict(self.cli_json("models", "publish", str(bundle)))

    def start_round(self, strategy: str, *args: str) -> dict[str, Any]:
        return dict(self.cli_json("rounds", "start", "--strategy", strategy, *args))

    def round_status(self, round_id: str) -> dict[str, Any]:
        # A failed round exits with a usage code but still prints its JSON; read it either way.
        done = subprocess.run(
            [
                str(HUB_BIN),
                "rounds",
                "status",
                round_id,
                "--data-dir",
                str(self.data_dir),
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        try:
            return dict(json.loads(done.stdout))
        except json.JSONDecodeError:
            raise HubError(
                f"fedclinic-hub rounds status {round_id} failed:\n{done.stdout}\n{done.stderr}"
            ) from None

    def wait_round(self, round_id: str, timeout: float) -> dict[str, Any]:
        """Poll ``rounds status`` until the round is published or failed; HubError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.round_status(round_id)
            if info["state"] in ("published", "failed"):
                return info
            if time.monotonic() > deadline:
                raise HubError(
                    f"round {round_id} still {info['state']} after {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(1.0)
