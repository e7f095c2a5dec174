"""kill -9 of a real edge node at random points of a 200-instance burst: nothing lost, nothing run twice.

Each trial: a fresh node with the test bundle, ``storescu`` sends 200 real instances (4 studies), the node is
killed with SIGKILL once a random number of them is acknowledged, restarted on the same data directory, and
left to finish. Counted: acknowledged instances missing from the spool (or with other pixel data), and
studies with more than one finished run.

    python bench/kill_burst.py --trials 20 --bundle build/test-bundle
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from harness.dcmtk import dcmtk  # noqa: E402  (the repo root must be importable first)

EDGE_BIN = Path(sys.executable).parent / "fedclinic-edge"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLINIC_EDGE_")} | {"TCP_NODELAY": "1"}
_SENT = re.compile(r"Sending file: (.+)$")
_RSP = re.compile(r"Received Store Response \((\w+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_burst(out: Path, source: Path, n: int, studies: int) -> dict[str, bytes]:
    """``n`` copies of ``source`` with fresh UIDs in ``studies`` studies; returns SOP UID -> pixel data."""
    ds = pydicom.dcmread(source)
    out.mkdir(parents=True)
    per = -(-n // studies)
    pixels: dict[str, bytes] = {}
    for i in range(n):
        if i % per == 0:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i % per + 1
        path = out / f"i{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        # As written (an odd-length value gets its pad byte), which is what the node receives.
        pixels[str(ds.SOPInstanceUID)] = bytes(pydicom.dcmread(path).PixelData)
    return pixels


def acknowledged(log: str) -> list[str]:
    ok, current = [], None
    for line in log.splitlines():
        if m := _SENT.search(line):
            current = m.group(1).strip()
        elif (m := _RSP.search(line)) and current is not None:
            if m.group(1) == "Success":
                ok.append(current)
            current = None
    return ok


def echo(port: int) -> bool:
    cmd = [dcmtk("echoscu"), "-aec", "EDGE", "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, env=ENV, timeout=30).returncode == 0


def start(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(EDGE_BIN), "serve", "--config", str(config)], stdout=out, stderr=out, env=ENV
        )
    deadline = time.time() + 60
    while not echo(port):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the edge node did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def query(data: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{data / 'edge.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return list(conn.execute(sql).fetchall())
    finally:
        conn.close()


def trial(work: Path, burst: Path, pixels: dict[str, bytes], bundle: Path, kill_at: int) -> dict[str, int]:
    port = free_port()
    data = work / "data"
    config = work / "edge.toml"
    config.write_text(
        f'ae_title = "EDGE"\nport = {port}\ndata_dir = "{data}"\nquiet_seconds = 1.0\n'
        f'study_quiet_seconds = 0.5\ntrusted_keys = "{bundle.parent / "hub.pub"}"\n'
        'providers = ["CPUExecutionProvider"]\n'
    )
    log = work / "edge.log"
    node = start(config, port, log)
    subprocess.run(
        [str(EDGE_BIN), "install-bundle", str(bundle), "--config", str(config)],
        env=ENV,
        check=True,
        capture_output=True,
    )
    sent_log = work / "storescu.log"
    files = sorted(burst.iterdir())
    with sent_log.open("w") as out:
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aec", "EDGE", "127.0.0.1", str(port), *map(str, files)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
        deadline = time.time() + 120
        while sent_log.read_text().count("Store Response (Success") < kill_at and sender.poll() is None:
            if time.time() > deadline:
                break
            time.sleep(0.002)
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        sender.wait(120)
    ok = acknowledged(sent_log.read_text())
    node = start(config, port, log)
    deadline = time.time() + 300
    while query(data, "SELECT COUNT(*) FROM studies WHERE state IN ('received', 'queued', 'processing')")[0][
        0
    ]:
        if time.time() > deadline:
            raise SystemExit(f"the node did not finish: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    spooled = {str(u): Path(str(p)) for u, p in query(data, "SELECT sop_instance_uid, path FROM instances")}
    lost = 0
    for name in ok:
        uid = str(pydicom.dcmread(name, stop_before_pixels=True).SOPInstanceUID)
        path = spooled.get(uid)
        if path is None or bytes(pydicom.dcmread(path).PixelData) != pixels[uid]:
            lost += 1
    twice = query(
        data,
        "SELECT COUNT(*) FROM (SELECT study_id FROM runs WHERE status IN ('done', 'skipped', 'failed')"
        " GROUP BY study_id HAVING COUNT(*) > 1)",
    )[0][0]
    node.terminate()
    node.wait(60)
    return {"kill_at": kill_at, "acknowledged": len(ok), "lost": lost, "processed_twice": int(str(twice))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "build" / "test-bundle" / "bundle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data_root = Path(os.environ.get("FEDCLINIC_DATA", REPO_ROOT.parent / "shared" / "data"))
    source = data_root / "dicom" / "highdicom" / "dx_image.dcm"
    rng = random.Random(args.seed)
    results = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        burst = Path(tmp) / "burst"
        pixels = make_burst(burst, source, args.instances, studies=4)
        for i in range(args.trials):
            work = Path(tmp) / f"trial{i:02d}"
            work.mkdir()
            r = trial(work, burst, pixels, args.bundle, rng.randrange(1, args.instances))
            results.append(r)
            print(json.dumps(r), flush=True)
    summary = {
        "trials": len(results),
        "instances": args.instances,
        "acknowledged": sum(r["acknowledged"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "processed_twice": sum(r["processed_twice"] for r in results),
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "trials": results}, indent=1))


if __name__ == "__main__":
    main()
