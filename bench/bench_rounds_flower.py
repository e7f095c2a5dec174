"""Flower's deployment runtime doing bench_rounds.py's round: SuperLink + N SuperNodes + ``flwr run``.

The same FedAvg round of the 70k-parameter student's 32 tensors (``bench/flower_app``), clients that answer at
once with a small delta, every node in every round. Each round is timed inside the ServerApp from configuring
it to its aggregate. Runs in its own venv, so that flwr never enters fedclinic's dependencies:

    python3 -m venv /work/flwr-venv && /work/flwr-venv/bin/pip install flwr==1.42.0 numpy
    OMP_NUM_THREADS=1 /work/flwr-venv/bin/python bench/bench_rounds_flower.py --nodes 10 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

APP = Path(__file__).resolve().parent / "flower_app"
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the SuperLink exited:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"nothing listens on port {port} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run(nodes: int, rounds: int, workdir: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "FLWR_HOME": str(workdir / "flwr-home"), "OMP_NUM_THREADS": "1"}
    # The SuperLink and SuperNodes start flower-superexec and the apps by name: the venv's bin comes first.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # Flower 1.42 serves its Fleet, Control and runtime APIs over HTTP on one address.
    link = _port()
    (workdir / "flwr-home").mkdir()
    (workdir / "flwr-home" / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    procs = [
        _start(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link),
            ],
            workdir / "superlink.log",
            env,
        )
    ]
    try:
        _wait_port(link, procs[0], workdir / "superlink.log")
        for i in range(nodes):
            procs.append(
                _start(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{link}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(_port()),
                        "--node-config",
                        f"partition-id={i}",
                    ],
                    workdir / f"supernode-{i}.log",
                    env,
                )
            )
        time.sleep(5.0)  # the SuperNodes register
        app = workdir / "app"
        shutil.copytree(APP, app)
        out = workdir / "rounds.json"
        t0 = time.time()
        done = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(app),
                "bench",
                "--stream",
                "--run-config",
                f'nodes={nodes} num-server-rounds={rounds} out="{out}"',
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        wall = time.time() - t0
        if not out.exists():
            raise SystemExit(
                f"flwr run did not finish ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        timed = json.loads(out.read_text())
        return {"nodes": nodes, "rounds": timed, "run_wall_s": wall}
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for one flwr run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = []
    for n in args.nodes:
        with tempfile.TemporaryDirectory(prefix=f"bench-flower-{n}-") as tmp:
            result = run(n, args.rounds, Path(tmp), args.timeout)
        report.append(result)
        times = [r["end"] - r["start"] for r in result["rounds"] if "end" in r]
        for r in result["rounds"]:
            if "end" in r:
                print(
                    f"  {n} nodes, round {r['round']}: {r['end'] - r['start']:.3f} s, {r['replies']} replies"
                )
        print(
            f"{n} nodes: median {statistics.median(times):.3f} s per round (Flower {args.rounds} rounds)",
            flush=True,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
