"""The long fuzz: ≥ 10,000 mutated instances (the CI fuzz test's generator) over real associations.

Counted: listener deaths, unanswered cases, studies not in a final state, the node's peak RSS, and input text
values found in the node's log (DEBUG level).

    python bench/fuzz_edge.py --cases 10500 --bundle build/test-bundle/bundle
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import _config

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from edge_node.ingest.sop_classes import STORAGE_SOP_CLASSES  # noqa: E402
from harness.dcmtk import dcmtk  # noqa: E402
from harness.fuzz_cases import fuzz_cases, send_cases, source_files, text_values  # noqa: E402

EDGE_BIN = Path(sys.executable).parent / "fedclinic-edge"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLINIC_EDGE_")}
BATCH = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo(port: int) -> bool:
    cmd = [dcmtk("echoscu"), "-aec", "EDGE", "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, env=ENV, timeout=30).returncode == 0


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10500)
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "build" / "test-bundle" / "bundle")
    args = parser.parse_args()
    _config.STORE_SEND_CHUNKED_DATASET = True  # send each case's bytes as they are
    data_root = Path(os.environ.get("FEDCLINIC_DATA", REPO_ROOT.parent / "shared" / "data"))
    sources = source_files(data_root / "dicom")
    secrets = text_values(sources)
    supported = set(STORAGE_SOP_CLASSES)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        config = root / "edge.toml"
        config.write_text(
            f'ae_title = "EDGE"\nport = {port}\ndata_dir = "{root / "data"}"\nquiet_seconds = 5.0\n'
            f'trusted_keys = "{args.bundle.parent / "hub.pub"}"\nlog_level = "DEBUG"\n'
            'providers = ["CPUExecutionProvider"]\n'
        )
        log_path = root / "edge.log"
        with log_path.open("wb") as log:
            subprocess.run(
                [str(EDGE_BIN), "install-bundle", str(args.bundle), "--config", str(config)],
                env=ENV,
                check=True,
                capture_output=True,
            )
            node = subprocess.Popen(
                [str(EDGE_BIN), "serve", "--config", str(config)], stdout=log, stderr=log, env=ENV
            )
        try:
            while not echo(port):
                if node.poll() is not None:
                    raise SystemExit(log_path.read_text()[-2000:])
                time.sleep(0.1)
            answered: dict[int, int | None] = {}
            deaths = 0
            cases = fuzz_cases(sources, root / "cases", args.cases, args.seed, BATCH)
            batch = []
            for case in cases:
                batch.append(case)
                if len(batch) < BATCH:
                    continue
                answered.update(send_cases(port, [c for c in batch if c.sop_class_uid in supported]))
                for c in batch:
                    c.path.unlink()
                batch = []
                if node.poll() is not None:
                    deaths += 1
                    break
            deadline = time.time() + 600
            db = root / "data" / "edge.sqlite3"
            while time.time() < deadline:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
                waiting = conn.execute(
                    "SELECT COUNT(*) FROM studies WHERE state IN ('received', 'queued', 'processing')"
                ).fetchone()[0]
                states = dict(conn.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall())
                conn.close()
                if not waiting:
                    break
                time.sleep(1)
            alive = node.poll() is None and echo(port)
            peak = peak_rss(node.pid)
        finally:
            node.terminate()
            node.wait(60)
        log_text = log_path.read_text(errors="replace")
    sent = [i for i, s in answered.items() if s != -1]
    result = {
        "cases_generated": args.cases,
        "cases_sent": len(sent),
        "accepted": sum(1 for i in sent if answered[i] == 0),
        "refused_with_status": sum(1 for i in sent if answered[i] not in (0, None)),
        "unanswered": sum(1 for i in sent if answered[i] is None),
        "listener_deaths": deaths + (0 if alive else 1),
        "studies_by_state": states,
        "peak_rss_mib": round(peak / 2**20),
        "input_values_in_log": sum(1 for v in secrets if v in log_text),
        "tracebacks_in_log": log_text.count("Traceback"),
        "seconds": round(time.monotonic() - t0),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
