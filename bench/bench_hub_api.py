"""Hub API throughput on PostgreSQL with two workers: heartbeats and update submissions, 50 concurrent nodes.

A throwaway PostgreSQL cluster (Debian's binaries, as ``tests/support/postgres.py`` starts it), a real
``fedclinic-hub serve --workers 2`` over HTTPS on loopback, and N async nodes in this process, each with its
own pinned HTTPS connection. Phase 1: every node sends heartbeats back to back for ``--seconds``. Phase 2:
``--rounds`` FedAvg rounds of a 70k-parameter model; in each, every node pulls its task and its starting
tensors and submits a delta at the same moment (the last submission also closes and aggregates the round).
Reported: requests per second, p50 and p95 latency of each kind.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_hub_api.py --nodes 50 --seconds 10 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from edge_node.protocol.tensors import encode_tensors  # noqa: E402
from edge_node.protocol.updates import UpdateEnvelope, UpdateKind  # noqa: E402
from edge_node.protocol.wire import TaskList, UpdateSubmission  # noqa: E402
from hub.service.settings import load_settings  # noqa: E402
from hub.store.artifacts import store_tensors  # noqa: E402
from hub.store.database import open_database  # noqa: E402
from tests.support.hub_server import EnrolledNode, HubServer, init_hub  # noqa: E402
from tests.support.postgres import postgres_cluster  # noqa: E402

#: About 70k float32 parameters, shaped like a small CNN student.
MODEL = {
    "conv1.weight": (32, 1, 3, 3),
    "conv2.weight": (64, 32, 3, 3),
    "conv3.weight": (64, 64, 3, 3),
    "fc.weight": (2, 7200),
    "fc.bias": (2,),
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


async def heartbeats(url: str, ctx: object, nodes: list[EnrolledNode], seconds: float) -> list[float]:
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def one(node: EnrolledNode) -> None:
        async with httpx.AsyncClient(base_url=url, verify=ctx, headers=node.headers, timeout=60) as client:  # type: ignore[arg-type]
            body = {"edge_version": "bench", "health": "ok", "counts": {"studies_done": 1}}
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await client.post("/v1/node/heartbeat", json=body)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()

    await asyncio.gather(*(one(n) for n in nodes))
    return latencies


async def submissions(
    server: HubServer, ctx: object, nodes: list[EnrolledNode], artifact: str, rounds: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    busy = 0.0
    rng = np.random.default_rng(0)
    clients = [
        httpx.AsyncClient(base_url=server.url, verify=ctx, headers=n.headers, timeout=120)  # type: ignore[arg-type]
        for n in nodes
    ]
    admin = httpx.AsyncClient(base_url=server.url, verify=ctx, headers=server.admin_headers, timeout=120)  # type: ignore[arg-type]
    try:
        for _ in range(rounds):
            r = await admin.post(
                "/v1/admin/rounds", json={"strategy": "fedavg", "model_artifact": artifact, "deadline_s": 600}
            )
            r.raise_for_status()
            round_id = r.json()["round_id"]
            bodies = []
            for node, client in zip(nodes, clients, strict=True):
                (task,) = TaskList.model_validate((await client.get("/v1/node/tasks")).json()).tasks
                (await client.get(f"/v1/tasks/{task.task_id}/params")).raise_for_status()
                delta = {t.name: rng.normal(scale=1e-3, size=t.shape).astype(t.dtype) for t in task.expected}
                payload = encode_tensors(delta)
                env = UpdateEnvelope(
                    node_id=node.node_id,
                    round=task.round,
                    kind=UpdateKind.WEIGHTS_DELTA,
                    num_examples=10,
                    payload_sha256=hashlib.sha256(payload).hexdigest(),
                    payload_bytes=len(payload),
                )
                sub = UpdateSubmission(
                    task_id=task.task_id, envelope=env, payload_b64=base64.b64encode(payload).decode()
                )
                bodies.append((client, task.task_id, sub.model_dump(mode="json")))

            async def send(client: httpx.AsyncClient, task_id: str, body: dict[str, object]) -> None:
                t0 = time.perf_counter()
                r = await client.post(f"/v1/tasks/{task_id}/update", json=body)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()

            t0 = time.perf_counter()
            await asyncio.gather(*(send(c, t, b) for c, t, b in bodies))
            busy += time.perf_counter() - t0
            while (await admin.get(f"/v1/admin/rounds/{round_id}")).json()["state"] != "published":
                await asyncio.sleep(0.05)
    finally:
        for c in [*clients, admin]:
            await c.aclose()
    return latencies, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with postgres_cluster() as pg, tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        url = pg.create_database("bench")
        init_hub(Path(tmp) / "hub", database_url=url)
        server = HubServer(Path(tmp) / "hub", workers=args.workers, env={"FEDCLINIC_HUB_TICK_S": "1"})
        server.start()
        try:
            with server.client() as client:
                nodes = [server.enroll(client, f"bench-{i}") for i in range(args.nodes)]
            settings = load_settings(server.data_dir)
            db = open_database(settings.db_url, migrate=False)
            with db.session() as session:
                artifact = store_tensors(session, {k: np.zeros(s, np.float32) for k, s in MODEL.items()})
            db.close()
            ctx = server.ssl_context()
            beats = asyncio.run(heartbeats(server.url, ctx, nodes, args.seconds))
            updates, busy = asyncio.run(submissions(server, ctx, nodes, artifact, args.rounds))
        except Exception:
            log = server.log_path.read_text(errors="replace") if server.log_path else ""
            print(
                "\n".join(line for line in log.splitlines() if " 200 OK" not in line)[-6000:], file=sys.stderr
            )
            raise
        finally:
            server.stop()
    params = sum(int(np.prod(s)) for s in MODEL.values())
    report = {
        "nodes": args.nodes,
        "workers": args.workers,
        "store": "postgresql",
        "cpus": os.cpu_count(),
        "heartbeat": {
            "requests": len(beats),
            "per_s": round(len(beats) / args.seconds, 1),
            "p50_ms": round(pct(beats, 0.50), 1),
            "p95_ms": round(pct(beats, 0.95), 1),
        },
        "update": {
            "params": params,
            "requests": len(updates),
            "per_s": round(len(updates) / busy, 1),
            "p50_ms": round(pct(updates, 0.50), 1),
            "p95_ms": round(pct(updates, 0.95), 1),
            "mean_ms": round(statistics.mean(updates) * 1000, 1),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
