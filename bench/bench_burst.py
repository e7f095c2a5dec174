"""Burst: 200 single-image studies from ``storescu`` in one association → every SR in a real Orthanc.

Two receivers take turns on the same files, in the same run:

* **node**: a real ``fedclinic-edge serve`` (PneumoniaMNIST test bundle, onnxruntime CPU, one thread) that
  sends its SRs to Orthanc;
* **floor**: dcmtk's ``storescp`` that, for every file it receives, runs ``storescu`` to send a prebuilt SR
  of that study to Orthanc: receiving and sending back, no analysis. The SRs are built before the clock
  starts.

A third figure bounds any sender that keeps to one association per destination: ``storescu`` storing the
same SRs in a fresh Orthanc over one association.

The clock starts when ``storescu`` starts and stops when Orthanc holds one SR per study (``GET /statistics``,
polled every 20 ms). A fresh Orthanc for each receiver. The node's CPU time (user + system, /proc) over the
burst divided by the studies is its work per study. ``--profile DIR`` attaches py-spy to the node during the
burst and writes a flame graph (``burst.svg``) and the collapsed stacks (``burst.collapsed.txt``) there.

    OMP_NUM_THREADS=1 FEDCLINIC_TEST_BUNDLE=build/test-bundle .venv/bin/python bench/bench_burst.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from harness.dcmtk import dcmtk  # noqa: E402  (the repo root must be importable first)
from harness.demo.clinic import EdgeNode, find_bundle  # noqa: E402
from harness.demo.orthanc import Orthanc, free_port  # noqa: E402

TARGET_STUDIES_PER_S = 20.0
TARGET_FLOOR_RATIO = 2.0
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLINIC_EDGE_")} | {
    "TCP_NODELAY": "1",
    "OMP_NUM_THREADS": "1",
}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_count(orthanc: Orthanc, n: int, timeout: float, alive: Callable[[], bool]) -> float:
    """Poll Orthanc until it holds ``n`` instances; returns the perf_counter time it first did."""
    deadline = time.perf_counter() + timeout
    while True:
        count = int(orthanc.get_json("/statistics")["CountInstances"])
        now = time.perf_counter()
        if count >= n:
            return now
        if now > deadline or not alive():
            raise SystemExit(f"only {count} of {n} results reached Orthanc")
        time.sleep(0.02)


def _storescu(port: int, aet: str, files: list[Path]) -> subprocess.CompletedProcess[bytes]:
    # One association for the whole burst, as a PACS re-sending a backlog does.
    cmd = [dcmtk("storescu"), "-aec", aet, "-nh", "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, env=ENV, timeout=600, check=True)


def _floor_results(sources: list[Path], out: Path) -> None:
    """One SR per source, named as storescp names the received file (``CR.<SOP Instance UID>``)."""
    import numpy as np
    import pydicom

    from edge_node.analysis.findings import Finding
    from edge_node.analysis.report_sr import build_sr
    from edge_node.protocol.manifest import Manifest

    bundle = find_bundle()
    assert bundle is not None
    manifest = Manifest.model_validate_json((bundle.bundle / "manifest.json").read_text())
    out.mkdir(parents=True)
    for path in sources:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        finding = Finding(
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            score=float(np.float32(0.5)),
            label=manifest.task.classes[0].name,
            present=False,
        )
        sr = build_sr([ds], [finding], manifest)
        sr.save_as(out / f"CR.{ds.SOPInstanceUID}", enforce_file_format=True)


def run_floor(work: Path, sources: list[Path]) -> dict[str, float]:
    results = work / "floor-sr"
    _floor_results(sources, results)
    with Orthanc(workdir=work / "orthanc-floor") as orthanc:
        port = free_port()
        send_back = f"{dcmtk('storescu')} -aec {orthanc.aet} 127.0.0.1 {orthanc.dicom_port} {results}/#f"
        received = work / "floor-received"
        received.mkdir()
        scp = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "FLOOR", "-od", str(received), "-xcr", send_back, str(port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            t0 = time.perf_counter()
            _storescu(port, "FLOOR", sources)
            t_sent = time.perf_counter()
            t1 = _wait_count(orthanc, len(sources), 300.0, lambda: scp.poll() is None)
        finally:
            scp.terminate()
            scp.wait(timeout=10)
    return {"seconds": t1 - t0, "send_seconds": t_sent - t0}


def run_one_association(work: Path, n: int) -> float:
    """Seconds for ``storescu`` to store the floor's prebuilt SRs in a fresh Orthanc over one association.

    What any sender that keeps to one association per destination can reach with this PACS: each C-STORE
    waits for Orthanc to store the object before the next one goes.
    """
    results = sorted((work / "floor-sr").iterdir())[:n]
    with Orthanc(workdir=work / "orthanc-one") as orthanc:
        t0 = time.perf_counter()
        _storescu(orthanc.dicom_port, orthanc.aet, results)
        return _wait_count(orthanc, len(results), 300.0, lambda: True) - t0


def run_node(
    work: Path, sources: list[Path], *, study_quiet: float, profile: Path | None
) -> dict[str, float]:
    bundle = find_bundle()
    assert bundle is not None
    with Orthanc(workdir=work / "orthanc-node") as orthanc:
        port = free_port()
        node = EdgeNode(
            root=work / "edge",
            port=port,
            settings={
                "ae_title": "EDGE",
                "host": "127.0.0.1",
                "port": port,
                "data_dir": str(work / "edge" / "data"),
                "providers": ["CPUExecutionProvider"],
                "intra_op_threads": 1,
                "trusted_keys": str(bundle.public_key),
                "send_secondary_capture": False,
                "destinations": [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
                "study_quiet_seconds": study_quiet,
                "log_level": "WARNING",
            },
        )
        node.write_config()
        done = node.cli("install-bundle", str(bundle.bundle))
        if done.returncode != 0:
            raise SystemExit(f"install-bundle failed:\n{done.stdout}\n{done.stderr}")
        node.start()
        assert node.proc is not None
        pid = node.proc.pid
        spies: list[subprocess.Popen[bytes]] = []
        try:
            deadline = time.monotonic() + 60
            echo = [dcmtk("echoscu"), "-aec", "EDGE", "127.0.0.1", str(port)]
            while subprocess.run(echo, capture_output=True, env=ENV).returncode != 0:
                if not node.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"the node did not come up:\n{node.log_text()[-3000:]}")
                time.sleep(0.2)
            time.sleep(1.0)  # the node warms its model and result builders after it listens
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                spies = _py_spy(pid, profile)
            cpu0 = _cpu_seconds(pid)
            t0 = time.perf_counter()
            _storescu(port, "EDGE", sources)
            t_sent = time.perf_counter()
            t1 = _wait_count(orthanc, len(sources), 300.0, node.alive)
            cpu = _cpu_seconds(pid) - cpu0
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes its files when interrupted
            for spy in spies:
                spy.wait(timeout=120)
            node.stop()
    return {"seconds": t1 - t0, "send_seconds": t_sent - t0, "cpu_seconds": cpu}


def _py_spy(pid: int, out: Path) -> list[subprocess.Popen[bytes]]:
    """Two py-spy recorders (100 Hz each, every thread, idle included): the flame graph and the raw stacks."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    cmd = [spy, "record", "--pid", str(pid), "--rate", "100", "--threads", "--idle"]
    outputs = (("flamegraph", "burst.svg"), ("raw", "burst.collapsed.txt"))
    return [
        subprocess.Popen(
            [*cmd, "--format", kind, "--output", str(out / name)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for kind, name in outputs
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200, help="single-image studies (default 200)")
    parser.add_argument(
        "--study-quiet", type=float, default=2.0, help="the node's study_quiet_seconds (default 2: shipped)"
    )
    parser.add_argument("--skip-floor", action="store_true", help="measure the node only")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the node; files go here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)

    from hub.data.dicomize import dicomize_images
    from hub.data.medmnist import load_medmnist

    if find_bundle() is None:
        parser.error("no signed test bundle: run `make test-bundle` or set FEDCLINIC_TEST_BUNDLE")
    data_env = os.environ.get("FEDCLINIC_DATA")
    data_root = Path(data_env) if data_env else REPO_ROOT.parent / "shared" / "data"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-burst-"))
    work.mkdir(parents=True, exist_ok=True)
    images = load_medmnist("pneumoniamnist", "test", root=data_root).images
    studies = dicomize_images(
        images, work / "cr", dataset="pneumoniamnist", split="test", indices=range(args.studies)
    )
    sources = [s.path for s in studies]

    node = run_node(work, sources, study_quiet=args.study_quiet, profile=args.profile)
    floor = None if args.skip_floor else run_floor(work, sources)
    one = None if args.skip_floor else run_one_association(work, len(sources))
    n = len(sources)
    result: dict[str, object] = {
        "studies": n,
        "node_seconds": round(node["seconds"], 2),
        "node_studies_per_s": round(n / node["seconds"], 1),
        "node_send_seconds": round(node["send_seconds"], 2),
        "node_cpu_ms_per_study": round(1000 * node["cpu_seconds"] / n, 1),
        "study_quiet_seconds": args.study_quiet,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    line = (
        f"burst {n} single-image studies -> SR in Orthanc: node {result['node_studies_per_s']} studies/s "
        f"({result['node_seconds']} s, storescu done after {result['node_send_seconds']} s, "
        f"{result['node_cpu_ms_per_study']} ms node CPU per study)"
    )
    if floor is not None:
        result["floor_seconds"] = round(floor["seconds"], 2)
        result["floor_studies_per_s"] = round(n / floor["seconds"], 1)
        result["node_over_floor_time"] = round(node["seconds"] / floor["seconds"], 2)
        line += (
            f"; floor {result['floor_studies_per_s']} studies/s ({result['floor_seconds']} s); "
            f"node time / floor time {result['node_over_floor_time']}"
        )
    if one is not None:
        result["orthanc_one_association_seconds"] = round(one, 2)
        result["orthanc_one_association_ms_per_sr"] = round(1000 * one / n, 1)
        line += (
            f"; {n} SRs over one association to Orthanc alone: {result['orthanc_one_association_seconds']} s"
        )
    print(line + f"; load {result['load_average_1m']}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    met = n / node["seconds"] >= TARGET_STUDIES_PER_S
    if floor is not None:
        met = met and node["seconds"] / floor["seconds"] <= TARGET_FLOOR_RATIO
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
