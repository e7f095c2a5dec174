"""DICOM ingest throughput: storescu → our durable listener vs storescu → dcmtk ``storescp -od``.

300 real 512x512 CT slices (TCIA COVID-19-NY-SBU, copied with fresh UIDs) go from storescu over one
association per run, then (``--associations 1 4``) from four storescu processes started together, each
sending a quarter of them, as a PACS with parallel senders does. Receivers, alternating in the same session,
each started fresh per run:

* ``edge``: a real ``fedclinic-edge serve`` process as installed: the native receive transport
  (``edge_node.ingest.native_transport``) with ``receive_processes`` receiver processes (default 2,
  ``--receive-processes``; ``edge_node.ingest.receiver_process``): the node accepts and hands each
  connection to a receiver. Every instance is written into a spool slot whose name is already durable as
  its fragments arrive and fsynced (one flush) before the success status goes back; after it, the slot is
  renamed into place and its row committed to SQLite (WAL, synchronous=NORMAL) (see
  ``edge_node.ingest.spool``). No model is installed, so the worker does not compete for the CPU: this
  measures ingest only. Its CPU figure adds up the node and its receivers.
  Each receiver keeps its spool reserve (``spool_reserve_bytes``, 512 MiB by default: slots written
  through with zeros in idle time, so that an instance's flush waits for no journal commit;
  ``edge_node.ingest.slot_pool``); the run starts once the reserve is made, as on a node that has been idle.
* ``edge-noreserve``: the same node with ``spool_reserve_bytes = 0`` (every instance into an empty slot):
  what the reserve is worth, in the same run.
* ``edge-threads``: the same node with ``receive_processes = 0``: every association a thread of the node's
  one process (one interpreter lock for all of them).
* ``edge-pynetdicom``: the same node with ``receive_transport = "pynetdicom"``; the ratios of the three,
  taken in the same run, are what a loaded machine disturbs least.
* ``storescp``: dcmtk's ``storescp -od DIR`` (no fsync), the reference; ``--fork`` (a process per
  association) when there are several associations.
* ``pynetdicom-null``: a pynetdicom 3.0 SCP that answers success without touching the disk (TCP_NODELAY,
  same contexts as the edge). Not a target: it is the ceiling any pynetdicom-based listener can reach on
  this machine, so it shows how much of the gap is the toolkit and how much is durability.

storescu and storescp run with ``TCP_NODELAY=1``; the edge listener sets TCP_NODELAY itself. Every run
starts after a ``sync``, so that no receiver's flushes wait behind the data an earlier one left unwritten.
The number reported is the median files/s over the repetitions, and the ratio edge/storescp (targets: ≥ 0.5
with one association, ≥ 0.7 with four), beside edge/edge-threads and edge/edge-pynetdicom.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ingest.py --associations 1 4 --json build/bench_ingest.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pydicom
from pydicom.uid import generate_uid
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from harness.dcmtk import dcmtk  # noqa: E402  (the repo root must be importable first)

EDGE_BIN = Path(sys.executable).parent / "fedclinic-edge"
TARGET_RATIO = 0.5
TARGET_RATIO_FOUR = 0.7
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def data_dir() -> Path:
    env = os.environ.get("FEDCLINIC_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_slices(out: Path, n: int) -> list[Path]:
    """``n`` copies of the real 512x512 axial CT slices, with fresh UIDs (one study, one series)."""
    sources = sorted((data_dir() / "dicom" / "tcia_covid19_ny_sbu").rglob("axial_*.dcm"))
    if not sources:
        raise SystemExit(f"no TCIA CT slices under {data_dir()}; set FEDCLINIC_DATA")
    datasets = [pydicom.dcmread(p) for p in sources]
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = datasets[i % len(datasets)]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = out / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_echo(port: int, aet: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{aet} exited with {proc.returncode} before answering C-ECHO")
        echo = subprocess.run(
            [dcmtk("echoscu"), "-aec", aet, "127.0.0.1", str(port)],
            capture_output=True,
            env=DCMTK_ENV,
            timeout=30,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"{aet} did not answer C-ECHO within {timeout} s")


#: The edge's spool reserve per receiving process, and its slot size: the node's defaults.
RESERVE_BYTES = 512 * 1024 * 1024
SLOT_BYTES = 1024 * 1024


def wait_reserve(pools: Path, slots: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Until the node's receiving processes have written their reserve slots (each ``SLOT_BYTES``)."""
    deadline = time.monotonic() + timeout
    while True:
        ready = 0
        for slot in pools.rglob("*.slot"):
            try:
                ready += slot.stat().st_size >= SLOT_BYTES
            except FileNotFoundError:
                continue
        if ready >= slots:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the edge made {ready} of {slots} reserve slots")
        time.sleep(0.2)


_TICK = os.sysconf("SC_CLK_TCK")
#: CPU seconds each receiver process spent in its last run (user + system, reaped children included),
#: keyed by receiver: unlike files/s, CPU per instance hardly moves with other engineers' load.
CPU_SECONDS: dict[int, float] = {}


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid`` (/proc/PID/stat fields 14-17), plus the same of its
    running children (the edge node's receiver processes; storescp --fork's children are reaped, so they
    are in its cutime + cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    own = sum(int(f) for f in fields[11:15]) / _TICK
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):  # each thread lists the children it started
        try:
            kids += [int(c) for c in task.read_text().split()]
        except FileNotFoundError:
            continue
    return own + sum(cpu_seconds(kid) for kid in kids)


def send(port: int, aet: str, files: list[Path], associations: int, receiver: int | None = None) -> float:
    """Seconds for ``associations`` storescu processes, started together, to send ``files`` between them.

    With ``receiver`` (its pid), the CPU it spent meanwhile goes to ``CPU_SECONDS[receiver]``.
    """
    cpu0 = cpu_seconds(receiver) if receiver is not None else 0.0
    shares = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [dcmtk("storescu"), "-aec", aet, "127.0.0.1", str(port), *map(str, share)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=DCMTK_ENV,
        )
        for share in shares
    ]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    elapsed = time.perf_counter() - t0
    if receiver is not None:
        time.sleep(0.3)  # storescp --fork reaps its children after they answer: count them too
        CPU_SECONDS[receiver] = cpu_seconds(receiver) - cpu0
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"storescu to {aet} failed: {err[-2000:]}")
    return elapsed


def run_edge(
    files: list[Path],
    work: Path,
    associations: int,
    max_pdu: int,
    transport: str = "native",
    receive_processes: int = 2,
    reserve_bytes: int = RESERVE_BYTES,
) -> float:
    port = free_port()
    root = work / f"edge-{time.monotonic_ns()}"
    root.mkdir()
    config = root / "edge.toml"
    config.write_text(
        f'ae_title = "EDGE"\nport = {port}\ndata_dir = "{root / "data"}"\nquiet_seconds = 3600\n'
        f'log_level = "WARNING"\nmax_pdu_bytes = {max_pdu}\nreceive_transport = "{transport}"\n'
        f"receive_processes = {receive_processes}\n"
        f"spool_reserve_bytes = {reserve_bytes}\nspool_slot_bytes = {SLOT_BYTES}\n"
        # No clinician page: its fixed default port may be taken on a shared machine, and it is not ingest.
        "page_enabled = false\n"
        # Room for the parallel senders and the C-ECHO probe whose connection may still be closing.
        f"max_associations_per_peer = {associations + 2}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLINIC_EDGE_")}
    log = (root / "edge.log").open("wb")
    proc = subprocess.Popen(
        [str(EDGE_BIN), "serve", "--config", str(config)], stdout=log, stderr=log, env=env
    )
    try:
        wait_echo(port, "EDGE", proc)
        receiving = max(receive_processes, 1) if transport == "native" else 1
        wait_reserve(root / "data" / "spool" / ".pool", receiving * (reserve_bytes // SLOT_BYTES), proc)
        elapsed = send(port, "EDGE", files, associations, proc.pid)
        conn = sqlite3.connect(root / "data" / "edge.sqlite3")
        stored = conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        conn.close()
        if stored != len(files):
            raise SystemExit(f"edge recorded {stored} of {len(files)} instances")
        return elapsed
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def serve_null(port: int, max_pdu: int) -> None:
    """The ``pynetdicom-null`` receiver (run in its own process by ``run_null``)."""
    from pynetdicom import AE, evt

    from edge_node.ingest.socket_options import NODELAY_HANDLERS
    from edge_node.ingest.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

    ae = AE(ae_title="NULLSCP")
    ae.maximum_pdu_size = max_pdu
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context("1.2.840.10008.1.1")
    handlers = [*NODELAY_HANDLERS, (evt.EVT_C_STORE, lambda event: (event.encoded_dataset(), 0)[1])]
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


def run_null(files: list[Path], work: Path, associations: int, max_pdu: int) -> float:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-null", str(port), "--max-pdu", str(max_pdu)],
        env=os.environ.copy(),
    )
    try:
        wait_echo(port, "NULLSCP", proc)
        return send(port, "NULLSCP", files, associations, proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)


def run_storescp(files: list[Path], work: Path, associations: int, max_pdu: int) -> float:
    port = free_port()
    out = work / f"storescp-{time.monotonic_ns()}"
    out.mkdir()
    # With several associations storescp forks one process per association (its best case on 2 cores);
    # without --fork it would serve them one after the other. Its own PDU limit stays dcmtk's default.
    fork = ["--fork"] if associations > 1 else []
    proc = subprocess.Popen(
        [dcmtk("storescp"), *fork, "-od", str(out), "-aet", "DCMTKSCP", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    try:
        wait_echo(port, "DCMTKSCP", proc)
        elapsed = send(port, "DCMTKSCP", files, associations, proc.pid)
        stored = sum(1 for p in out.iterdir() if p.is_file())
        if stored != len(files):
            raise SystemExit(f"storescp wrote {stored} of {len(files)} files")
        return elapsed
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="instances per run (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per receiver (default 3)")
    parser.add_argument(
        "--associations",
        type=int,
        nargs="+",
        default=[1, 4],
        help="concurrent storescu associations sharing the files, one measurement per value (default 1 4)",
    )
    parser.add_argument(
        "--max-pdu",
        type=int,
        default=1024 * 1024,
        help="the edge's max_pdu_bytes (and the pynetdicom-null receiver's); default 1 MiB",
    )
    parser.add_argument(
        "--receive-processes",
        type=int,
        default=2,
        help="the edge's receive_processes (default 2, the node's default); edge-threads runs with 0",
    )
    parser.add_argument(
        "--receivers",
        nargs="+",
        default=["edge", "edge-noreserve", "edge-threads", "edge-pynetdicom", "storescp", "pynetdicom-null"],
        choices=["edge", "edge-noreserve", "edge-threads", "edge-pynetdicom", "storescp", "pynetdicom-null"],
        help="receivers to measure (default all; edge and storescp are needed for the ratio)",
    )
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "build" / "bench_ingest.json")
    parser.add_argument("--serve-null", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_null:
        serve_null(args.serve_null, args.max_pdu)
        return 0
    if not {"edge", "storescp"} <= set(args.receivers):
        parser.error("--receivers must include edge and storescp (the ratio is edge / storescp)")
    console = Console()

    runners: dict[str, Callable[[list[Path], Path, int, int], float]] = {
        "edge": functools.partial(run_edge, receive_processes=args.receive_processes),
        "edge-noreserve": functools.partial(
            run_edge, receive_processes=args.receive_processes, reserve_bytes=0
        ),
        "edge-threads": functools.partial(run_edge, receive_processes=0),
        "edge-pynetdicom": functools.partial(run_edge, transport="pynetdicom", receive_processes=0),
        "storescp": run_storescp,
        "pynetdicom-null": run_null,
    }
    runners = {name: runners[name] for name in args.receivers}
    results = []
    load_at_start = os.getloadavg()
    console.print(
        f"load average at start: {load_at_start[0]:.1f} {load_at_start[1]:.1f} {load_at_start[2]:.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        files = make_slices(work / "src", args.files)
        total_bytes = sum(p.stat().st_size for p in files)
        for associations in args.associations:
            times: dict[str, list[float]] = {name: [] for name in runners}
            cpu: dict[str, list[float]] = {name: [] for name in runners}
            for rep in range(args.repeats):
                # Rotate which goes first, so that none always enjoys a warmer page cache or a quieter moment.
                names = list(runners)
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    # What the last receiver left to write (storescp never flushes its 160 MB) goes to disk
                    # now, not during the next receiver's run, whose flushes would wait behind it.
                    os.sync()
                    CPU_SECONDS.clear()
                    t = runners[name](files, work, associations, args.max_pdu)
                    times[name].append(t)
                    cpu_ms = 1000 * sum(CPU_SECONDS.values()) / args.files
                    cpu[name].append(cpu_ms)
                    rate = args.files / t
                    label = f"{associations} assoc. run {rep + 1} {name:15s}"
                    console.print(f"{label} {rate:7.1f} files/s ({t:.2f} s), CPU {cpu_ms:.2f} ms/instance")
            results.append(_summary(console, args, associations, times, total_bytes, cpu))

    target = {1: TARGET_RATIO, 4: TARGET_RATIO_FOUR}
    met = all(
        cast(float, r["ratio_edge_over_storescp"]) >= target.get(cast(int, r["associations"]), TARGET_RATIO)
        for r in results
    )
    result = {
        "benchmark": "ingest",
        "files": args.files,
        "bytes": total_bytes,
        "repeats": args.repeats,
        "max_pdu_bytes": args.max_pdu,
        "receive_processes": args.receive_processes,
        "runs": results,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "targets": {"1": TARGET_RATIO, "4": TARGET_RATIO_FOUR},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.json}")
    return 0 if met else 1


def _summary(
    console: Console,
    args: argparse.Namespace,
    associations: int,
    times: dict[str, list[float]],
    total: int,
    cpu: dict[str, list[float]],
) -> dict[str, object]:
    rates = {k: [args.files / t for t in v] for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in rates.items()}
    ratio = median["edge"] / median["storescp"]
    mb = total / 1e6
    table = Table(
        title=f"ingest: {args.files} CT slices 512x512 ({mb:.0f} MB), {associations} association(s), "
        f"max PDU {args.max_pdu}, edge with {args.receive_processes} receiver processes"
    )
    cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
    for column in ("receiver", "durable", "median files/s", "runs files/s", "median MB/s", "CPU ms/instance"):
        table.add_column(column)
    kinds = (
        ("edge", "flushed per instance, SQLite"),
        ("edge-noreserve", "flushed per instance, SQLite"),
        ("edge-threads", "flushed per instance, SQLite"),
        ("edge-pynetdicom", "flushed per instance, SQLite"),
        ("storescp", "no fsync"),
        ("pynetdicom-null", "nothing written"),
    )
    for name, durable in kinds:
        if name not in median:
            continue
        table.add_row(
            name,
            durable,
            f"{median[name]:.1f}",
            ", ".join(f"{r:.1f}" for r in rates[name]),
            f"{median[name] * mb / args.files:.1f}",
            f"{cpu_median[name]:.2f}",
        )
    console.print(table)
    target = TARGET_RATIO_FOUR if associations >= 4 else TARGET_RATIO
    verdict = "[green]meets[/green]" if ratio >= target else "[red]misses[/red]"
    console.print(f"edge / storescp = {ratio:.2f} ({verdict} the target ≥ {target})")
    ratios = {"ratio_edge_over_storescp": ratio}
    # The same node another way, in the same run: edge over it, and it over storescp.
    for other in ("edge-noreserve", "edge-threads", "edge-pynetdicom"):
        if other not in median:
            continue
        key = other.replace("-", "_")
        ratios[f"ratio_edge_over_{key}"] = median["edge"] / median[other]
        ratios[f"ratio_{key}_over_storescp"] = median[other] / median["storescp"]
        console.print(
            f"edge / {other} = {ratios[f'ratio_edge_over_{key}']:.2f}; "
            f"{other} / storescp = {ratios[f'ratio_{key}_over_storescp']:.2f}"
        )
    if "pynetdicom-null" in median:
        ratios["ratio_pynetdicom_null_over_storescp"] = median["pynetdicom-null"] / median["storescp"]
        console.print(
            f"pynetdicom-null / storescp = {ratios['ratio_pynetdicom_null_over_storescp']:.2f} "
            "(the ceiling of a pynetdicom listener here)"
        )
    return {
        "associations": associations,
        "seconds": times,
        "files_per_s": rates,
        "median_files_per_s": median,
        "cpu_ms_per_instance": cpu,
        "median_cpu_ms_per_instance": cpu_median,
        "load_average": os.getloadavg(),
        **ratios,
    }


if __name__ == "__main__":
    sys.exit(main())
