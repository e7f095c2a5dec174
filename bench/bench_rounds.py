"""Round overhead: a FedAvg round of the 70k-parameter student with N light nodes over real HTTPS on loopback.

A real ``fedclinic-hub serve`` (SQLite, one worker, its generated self-signed certificate) and N light async
clients in one process, each its own HTTPS connection pinned to the hub's certificate. Every client enrolls
with its own join code, then long-polls ``GET /v1/node/tasks?wait=``; when a task arrives it downloads the
starting tensors, answers at once with a small delta of exactly the expected names and shapes, and polls
again. A round's time runs from its creation to its published aggregate, from the hub's own records
(``created_at`` → ``updated_at`` of the published round); the wall time the operator sees (POST to the poll
that sees ``published``) is reported beside it. Between rounds the hub's CPU time is sampled while every node
is idle in its long-poll: what an idle federation costs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_rounds.py --nodes 10 50 200 --rounds 3

Flower's deployment runtime doing the same round: ``bench/bench_rounds_flower.py`` (separate venv).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from edge_node.protocol.tensors import decode_tensors, encode_tensors  # noqa: E402
from edge_node.protocol.updates import UpdateEnvelope  # noqa: E402
from edge_node.protocol.wire import (  # noqa: E402
    EnrollRequest,
    EnrollResponse,
    JoinCodeIssued,
    JoinCodeRequest,
    RoundInfo,
    TaskList,
    UpdateSubmission,
    decode_join_code,
)
from edge_node.uplink.credential import new_secret  # noqa: E402
from edge_node.uplink.transport import pinned_context  # noqa: E402

HUB_BIN = Path(sys.executable).parent / "fedclinic-hub"
STUDENT = "student_cnn_s"
#: Drop idle connections before uvicorn does (its keep-alive timeout is 5 s), so none is reused as it closes.
LIMITS = httpx.Limits(keepalive_expiry=2.0)


def student_params() -> dict[str, np.ndarray]:
    """The registered 70k-parameter student's state as numpy (what a FedAvg round of it moves)."""
    import torch

    from hub.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(STUDENT)
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children that were waited for (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _phases(db: Path, round_id: str) -> dict[str, float]:
    """Where a round's time went, from the hub's own timestamps (seconds after the round was created)."""
    import sqlite3

    def at(value: str) -> float:
        return datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp()

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        created, updated = conn.execute(
            "SELECT created_at, updated_at FROM rounds WHERE id = ?", (round_id,)
        ).fetchone()
        issued = conn.execute("SELECT MAX(created_at) FROM tasks WHERE round_id = ?", (round_id,)).fetchone()[
            0
        ]
        first, last = conn.execute(
            "SELECT MIN(received_at), MAX(received_at) FROM updates WHERE round_id = ?", (round_id,)
        ).fetchone()
    finally:
        conn.close()
    t0 = at(created)
    return {
        "tasks_issued_s": at(issued) - t0,
        "first_update_s": at(first) - t0,
        "last_update_s": at(last) - t0,
        "published_s": at(updated) - t0,
    }


@dataclass
class LightNode:
    index: int
    client: httpx.AsyncClient
    node_id: str = ""
    answered: int = 0
    errors: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event, poll_s: float) -> None:
        rng = np.random.default_rng(self.index)
        while not stop.is_set():
            try:
                r = await self.client.get("/v1/node/tasks", params={"wait": str(poll_s)})
                r.raise_for_status()
                for task in TaskList.model_validate_json(r.content).tasks:
                    if task.state.value != "open":
                        continue
                    p = await self.client.get(f"/v1/tasks/{task.task_id}/params")
                    p.raise_for_status()
                    decode_tensors(p.content)  # a real node reads its starting point
                    update = {}
                    for spec in task.expected:
                        dtype = np.dtype(spec.dtype)
                        if dtype.kind == "f":
                            update[spec.name] = (rng.standard_normal(spec.shape) * 1e-3).astype(dtype)
                        else:
                            update[spec.name] = np.zeros(spec.shape, dtype=dtype)
                    payload = encode_tensors(update)
                    envelope = UpdateEnvelope(
                        node_id=self.node_id,
                        round=task.round,
                        kind=task.kind,
                        num_examples=100,
                        payload_sha256=hashlib.sha256(payload).hexdigest(),
                        payload_bytes=len(payload),
                    )
                    body = UpdateSubmission(
                        task_id=task.task_id,
                        envelope=envelope,
                        payload_b64=base64.b64encode(payload).decode(),
                    )
                    u = await self.client.post(
                        f"/v1/tasks/{task.task_id}/update", json=body.model_dump(mode="json")
                    )
                    if u.status_code >= 400:
                        self.errors.append(f"{u.status_code} {u.text[:200]}")
                    else:
                        self.answered += 1
            except httpx.HTTPError as exc:
                if stop.is_set():
                    return
                self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)


class Hub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "hub-data"
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLINIC_HUB_")}
        self.env.update(
            {"OMP_NUM_THREADS": "1", "FEDCLINIC_HUB_MAX_WAIT_S": "30", "FEDCLINIC_HUB_TICK_S": "1"}
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(HUB_BIN), *args, "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=300,
        )
        if done.returncode != 0:
            raise SystemExit(f"fedclinic-hub {args[0]} failed: {done.stderr}")
        return done.stdout

    def start(self) -> None:
        self.cli("init", "--public-url", self.url)
        log = (self.root / "hub.log").open("wb")
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
            ],
            stdout=log,
            stderr=log,
            env=self.env,
            start_new_session=True,
        )
        self.cert = (self.data_dir / "tls" / "cert.pem").read_text()
        self.token = (self.data_dir / "admin.token").read_text().strip()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if (
                    httpx.get(
                        f"{self.url}/v1/health", verify=pinned_context(self.cert), timeout=2
                    ).status_code
                    == 200
                ):
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit("the hub did not start; see " + str(self.root / "hub.log"))

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


async def run_bench(n: int, rounds: int, workdir: Path, params: dict[str, np.ndarray]) -> dict[str, Any]:
    hub = Hub(workdir)
    hub.start()
    try:
        context = pinned_context(hub.cert)
        admin = httpx.AsyncClient(
            base_url=hub.url,
            verify=context,
            headers={"Authorization": f"Bearer {hub.token}"},
            timeout=60,
            limits=LIMITS,
        )
        nodes: list[LightNode] = []
        t0 = time.perf_counter()
        for i in range(n):
            issued = await admin.post(
                "/v1/admin/nodes", json=JoinCodeRequest(node_name=f"bench-{i:03d}").model_dump()
            )
            issued.raise_for_status()
            code = decode_join_code(JoinCodeIssued.model_validate_json(issued.content).join_code)
            secret = new_secret()
            client = httpx.AsyncClient(
                base_url=hub.url, verify=pinned_context(hub.cert), timeout=60, limits=LIMITS
            )
            enrolled = await client.post(
                "/v1/enroll",
                json=EnrollRequest(
                    join_secret=code.secret, credential=secret, edge_version="bench"
                ).model_dump(),
            )
            enrolled.raise_for_status()
            node_id = EnrollResponse.model_validate_json(enrolled.content).node_id
            client.headers["Authorization"] = f"Bearer {node_id}.{secret}"
            nodes.append(LightNode(i, client, node_id))
        enroll_s = time.perf_counter() - t0
        stop = asyncio.Event()
        workers = [asyncio.create_task(node.run(stop, 25.0)) for node in nodes]
        await asyncio.sleep(1.0)  # every node is in its long-poll

        start_npz = workdir / "start.npz"
        start_npz.write_bytes(encode_tensors(params))
        results = []
        for r in range(rounds):
            assert hub.proc is not None
            t_start = time.perf_counter()
            cpu_start = _cpu_seconds(hub.proc.pid)
            if r == 0:
                out = await asyncio.to_thread(
                    hub.cli,
                    "rounds",
                    "start",
                    "--strategy",
                    "fedavg",
                    "--model",
                    str(start_npz),
                    "-k",
                    str(n),
                    "--deadline",
                    "600",
                    "--format",
                    "json",
                )
                info = RoundInfo.model_validate(json.loads(out))
            else:
                made = await admin.post(
                    "/v1/admin/rounds", json={"strategy": "fedavg", "min_results": n, "deadline_s": 600}
                )
                made.raise_for_status()
                info = RoundInfo.model_validate_json(made.content)
            while info.state.value not in ("published", "failed"):
                # The round's time comes from the hub's records; this poll only sees the end, and must not
                # itself be a load on the hub that the round's figures then include.
                await asyncio.sleep(0.1)
                got = await admin.get(f"/v1/admin/rounds/{info.round_id}")
                got.raise_for_status()
                info = RoundInfo.model_validate_json(got.content)
            wall = time.perf_counter() - t_start
            # The hub's own CPU for the round: what it costs whatever else the machine is doing.
            hub_cpu = _cpu_seconds(hub.proc.pid) - cpu_start
            server = (info.updated_at - info.created_at).total_seconds()
            phases = _phases(hub.data_dir / "hub.db", info.round_id)
            results.append(
                {
                    "round": info.round,
                    "state": info.state.value,
                    "accepted": info.accepted,
                    "server_s": server,
                    "wall_s": wall,
                    "hub_cpu_s": hub_cpu,
                    **phases,
                }
            )
            print(
                f"  {n} nodes, round {info.round}: {info.state.value}, {info.accepted}/{n} updates, "
                f"{server:.3f} s (hub records), {wall:.3f} s wall, hub CPU {hub_cpu:.3f} s; "
                + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()),
                flush=True,
            )
            # Idle: every node waits in its long-poll; after a second for the round's last answers, sample
            # the hub's CPU over a few seconds (long-polls that expire in the window are part of the cost).
            await asyncio.sleep(1.0)
            c0, w0 = _cpu_seconds(hub.proc.pid), time.perf_counter()
            await asyncio.sleep(5.0)
            idle_cpu = (_cpu_seconds(hub.proc.pid) - c0) / (time.perf_counter() - w0)
            results[-1]["idle_cpu_fraction"] = idle_cpu
        stop.set()
        for node in nodes:
            await node.client.aclose()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await admin.aclose()
        errors = [e for node in nodes for e in node.errors]
        return {
            "nodes": n,
            "enroll_s": enroll_s,
            "rounds": results,
            "node_errors": len(errors),
            "first_errors": errors[:5],
            "answered": sum(node.answered for node in nodes),
        }
    finally:
        hub.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    params = student_params()
    n_params = sum(int(v.size) for v in params.values())
    print(f"{STUDENT}: {n_params} parameters in {len(params)} tensors", flush=True)
    report: dict[str, Any] = {"model": STUDENT, "parameters": n_params, "runs": []}
    for n in args.nodes:
        with tempfile.TemporaryDirectory(prefix=f"bench-rounds-{n}-") as tmp:
            run = asyncio.run(run_bench(n, args.rounds, Path(tmp), params))
        report["runs"].append(run)
        times = [r["server_s"] for r in run["rounds"]]
        print(
            f"{n} nodes: median {statistics.median(times):.3f} s per round (hub records), "
            f"hub CPU median {statistics.median(r['hub_cpu_s'] for r in run['rounds']):.3f} s per round, "
            f"every round published with {[r['accepted'] for r in run['rounds']]} updates, "
            f"idle hub CPU {max(r['idle_cpu_fraction'] for r in run['rounds']) * 100:.1f} %, "
            f"node errors {run['node_errors']}",
            flush=True,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
