"""Secure aggregation over the wire: hub time per round and bytes per node at N nodes, real HTTPS on loopback.

A real ``fedclinic-hub serve`` (SQLite, one worker) and N nodes in one process, one thread each, every one
running the node's own protocol code (``SecureAggregationRound`` over the pinned ``HubTransport``): advertise,
share, mask (clip at the node, then the ring encoding and masks), unmask; a node long-polls each step. The
update is a float32 vector of ``--values`` entries (93,025: the protection benchmark's CNN). Rounds
alternate between ``--connections``: ``kept`` (each node one HubTransport for the run, as its sync loop
keeps one) and ``fresh`` (a new connection per node per round). Per round:

- hub CPU: the hub process's user+system CPU seconds over the round (every request, relay long-poll,
  unmask), and of that its event-loop thread's (TLS, HTTP, reading bodies; the routes run in a thread pool);
- unmask → published: from the hub's own records, the closing of the unmask step (rebuilding the sum from
  the stored masked vectors and shares) to the published aggregate;
- bytes per node: request and response bodies of the protocol as the node counted them, against the deflated
  npz of its plain fp32 update (what a plain round sends).

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/bench_secagg_wire.py --nodes 10 20 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import text

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from edge_node.protection import ProtectionPipeline  # noqa: E402
from edge_node.protocol.protection import ProtectionSpec  # noqa: E402
from edge_node.protocol.tensors import encode_tensors  # noqa: E402
from edge_node.protocol.wire import Task, TaskList  # noqa: E402
from edge_node.uplink.credential import BearerAuth  # noqa: E402
from edge_node.uplink.secure_aggregation import SecureAggregationRound  # noqa: E402
from edge_node.uplink.transport import HubTransport  # noqa: E402
from hub.service.settings import load_settings  # noqa: E402
from hub.store.artifacts import store_tensors  # noqa: E402
from hub.store.database import open_database  # noqa: E402
from tests.support.hub_server import EnrolledNode, HubServer, init_hub  # noqa: E402


def _cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process, or of its thread ``tid`` (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat") if tid is None else Path(f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _at(value: Any) -> float:
    stamp = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return stamp.replace(tzinfo=timezone.utc).timestamp() if stamp.tzinfo is None else stamp.timestamp()


def _transport(hub: HubServer, node: EnrolledNode) -> HubTransport:
    """A node's pinned keep-alive client, as ``SyncLoop`` makes one for its whole life."""
    auth = BearerAuth(node.headers["Authorization"])
    return HubTransport(hub.url, hub.cert.read_text(), auth=auth, timeout=120)


def _node_round(
    hub: HubServer,
    node: EnrolledNode,
    task: Task,
    spec: ProtectionSpec,
    seed: int,
    long_poll_s: float,
    kept: HubTransport | None,
) -> dict[str, int]:
    """One node's protocol run, over its kept transport, or (``kept`` None) a connection of its own."""
    rng = np.random.default_rng(seed)
    update = {e.name: rng.normal(0, 1e-3, e.shape).astype(np.float32) for e in task.expected}
    with contextlib.ExitStack() as stack:
        transport = kept if kept is not None else stack.enter_context(_transport(hub, node))
        protocol = SecureAggregationRound.for_task(transport, node.node_id, task)
        protocol.long_poll_s = long_poll_s
        protected = protocol.run(update, spec, ProtectionPipeline(rng=rng))
    return {
        "sent": protocol.bytes_sent,
        "received": protocol.bytes_received,
        "masked_npz": len(protected.payload),
        "plain_npz": len(encode_tensors(update)),
    }


def _profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the hub process (collapsed stacks, idle threads left out) until it gets SIGINT."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    # --gil: only the thread holding the GIL, i.e. Python at work (TLS, zlib and SQLite release it).
    cmd = [str(spy), "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--nonblocking"]
    cmd.append("--gil")
    quiet = subprocess.DEVNULL
    return subprocess.Popen([*cmd, "--output", str(out)], stdout=quiet, stderr=quiet)


def run(
    n: int,
    rounds: int,
    values: int,
    workdir: Path,
    long_poll_s: float,
    connections: list[str],
    profile: Path | None = None,
) -> list[dict[str, Any]]:
    root = workdir / f"hub-{n}"
    init_hub(root)
    hub = HubServer(root, env={"FEDCLINIC_HUB_SECAGG_STEP_S": "60", "FEDCLINIC_HUB_TICK_S": "1"})
    hub.start()
    db = open_database(load_settings(root).db_url, migrate=False)
    out = []
    transports: list[HubTransport] = []
    try:
        with hub.client() as client:
            nodes = [hub.enroll(client, f"bench-{i:03d}") for i in range(n)]
            if "kept" in connections:
                transports = [_transport(hub, node) for node in nodes]
            with db.session() as session:
                art = store_tensors(session, {"w": np.zeros(values, np.float32)})
            for r, connection in itertools.product(range(rounds), connections):
                keep = connection == "kept"
                assert hub.proc is not None
                made = client.post(
                    "/v1/admin/rounds",
                    json={
                        "strategy": "fedavg",
                        "model_artifact": art,
                        "deadline_s": 600,
                        "protection": {"clip_norm": 1.0, "secure_aggregation": True},
                    },
                    headers=hub.admin_headers,
                )
                made.raise_for_status()
                round_id = made.json()["round_id"]
                tasks = []
                for i, node in enumerate(nodes):
                    if keep:  # the node learns of the task over its own connection, as its sync loop does
                        listed = TaskList.model_validate_json(
                            transports[i].request("GET", "/v1/node/tasks").content
                        )
                    else:
                        listed = TaskList.model_validate(
                            client.get("/v1/node/tasks", headers=node.headers).json()
                        )
                    tasks.append(next(t for t in listed.tasks if t.round_id == round_id))
                spec = tasks[0].protection
                assert spec is not None
                name = f"hub-{n}-r{r + 1}-{connection}.txt"
                spy = _profiler(hub.proc.pid, profile / name) if profile else None
                if spy is not None:
                    time.sleep(1.0)  # py-spy attaches
                pid = hub.proc.pid
                cpu0, loop0, wall0 = _cpu_seconds(pid), _cpu_seconds(pid, pid), time.perf_counter()
                with ThreadPoolExecutor(max_workers=n) as pool:
                    futures = [
                        pool.submit(
                            _node_round,
                            hub,
                            node,
                            task,
                            spec,
                            1000 * r + i,
                            long_poll_s,
                            transports[i] if keep else None,
                        )
                        for i, (node, task) in enumerate(zip(nodes, tasks, strict=True))
                    ]
                    per_node = [f.result() for f in futures]
                while (info := client.get(f"/v1/admin/rounds/{round_id}", headers=hub.admin_headers).json())[
                    "state"
                ] not in ("published", "failed"):
                    time.sleep(0.1)
                wall = time.perf_counter() - wall0
                cpu = _cpu_seconds(pid) - cpu0
                loop_cpu = _cpu_seconds(pid, pid) - loop0
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
                with db.session() as session:
                    (closed,) = session.execute(
                        text("SELECT closed_at FROM secagg_steps WHERE round_id = :r AND step = 'unmask'"),
                        {"r": round_id},
                    ).one()
                unmask_s = _at(info["updated_at"]) - _at(closed)
                row = {
                    "nodes": n,
                    "connection": connection,
                    "long_poll_s": long_poll_s,
                    "round": info["round"],
                    "state": info["state"],
                    "wall_s": round(wall, 2),
                    "hub_cpu_s": round(cpu, 2),
                    "hub_loop_cpu_s": round(loop_cpu, 2),
                    "unmask_to_published_s": round(unmask_s, 3),
                    "bytes_sent_per_node": int(statistics.mean(p["sent"] for p in per_node)),
                    "bytes_received_per_node": int(statistics.mean(p["received"] for p in per_node)),
                    "masked_npz": int(statistics.mean(p["masked_npz"] for p in per_node)),
                    "plain_npz": int(statistics.mean(p["plain_npz"] for p in per_node)),
                    "load_avg": round(os.getloadavg()[0], 1),
                }
                print(json.dumps(row), flush=True)
                out.append(row)
    finally:
        for transport in transports:
            transport.close()
        db.close()
        hub.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--values", type=int, default=93025)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--long-poll-s", type=float, default=25.0, help="how long one relay request of a node may wait"
    )
    parser.add_argument(
        "--connections",
        nargs="+",
        choices=("fresh", "kept"),
        default=["fresh", "kept"],
        help="fresh: each node opens a connection per round; kept: one per node for the run, as a node's "
        "sync loop keeps (rounds alternate between the two)",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="a folder: py-spy's collapsed stacks of the hub per round"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        for n in args.nodes:
            rows += run(
                n, args.rounds, args.values, Path(tmp), args.long_poll_s, args.connections, args.profile
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
