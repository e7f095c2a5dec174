"""What one durable write of a CT slice costs on this disk, by how its file was prepared.

The spool flushes each instance before it answers the sender (``edge_node.ingest.spool``); with one
association that flush is most of the node's time per instance. This measures, on the file system of
``--dir`` (default: a temporary directory beside the spool's usual place), the median wall time of writing
``--size`` bytes and flushing them into:

* ``empty``: an empty file whose name is already durable (the spool's ordinary slot), one ``write`` +
  ``fsync``: the baseline every ratio is against;
* ``empty+writeback``: the same, written in 64 KiB parts with the write-back of each started at once
  (``sync_file_range``; tried in the spool and taken out again: not faster here);
* ``fallocated``: a file ``posix_fallocate``d beforehand to 1 MiB (unwritten extents);
* ``reserve``: a file whose 1 MiB of zeros were written and flushed beforehand
  (``edge_node.ingest.slot_pool``), then ``fdatasync``;
* ``reserve+cut``: the same, then the zeros after the stream cut (``ftruncate``), as if in line.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_flush.py --json build/bench_flush.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_node.protocol.durable_file import fsync_directory

REPO_ROOT = Path(__file__).resolve().parents[1]
SLOT = 1024 * 1024
PART = 64 * 1024
_LIBC = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` to disk without waiting (Linux ``sync_file_range``)."""
    _LIBC.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)


def _prepare(directory: Path, count: int, how: str) -> list[Path]:
    directory.mkdir()
    zeros = bytes(SLOT)
    paths = []
    for i in range(count):
        path = directory / f"{i}.slot"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if how == "zeros":
                os.write(fd, zeros)
            elif how == "fallocate":
                os.posix_fallocate(fd, 0, SLOT)
            os.fsync(fd)
        finally:
            os.close(fd)
        paths.append(path)
    fsync_directory(directory)
    os.sync()
    return paths


def _timed(paths: list[Path], write: Callable[[int], None], gap_s: float) -> list[float]:
    times = []
    for path in paths:
        fd = os.open(path, os.O_WRONLY)
        try:
            t0 = time.perf_counter()
            write(fd)
            times.append((time.perf_counter() - t0) * 1000)
        finally:
            os.close(fd)
        time.sleep(gap_s)  # the sender's share between two instances
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=530_000, help="bytes per instance (a 512x512 CT slice)")
    parser.add_argument("--count", type=int, default=200, help="instances per variant (default 200)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "build" / "bench_flush.json")
    args = parser.parse_args(argv)
    data = os.urandom(args.size)

    def whole_fsync(fd: int) -> None:
        os.write(fd, data)
        os.fsync(fd)

    def parts_writeback(fd: int) -> None:
        for start in range(0, len(data), PART):
            written = os.write(fd, data[start : start + PART])
            start_writeback(fd, start, written)
        os.fsync(fd)

    def whole_fdatasync(fd: int) -> None:
        os.write(fd, data)
        os.fdatasync(fd)

    def whole_fdatasync_cut(fd: int) -> None:
        whole_fdatasync(fd)
        os.ftruncate(fd, len(data))

    variants: list[tuple[str, str, Callable[[int], None]]] = [
        ("empty", "empty", whole_fsync),
        ("empty+writeback", "empty", parts_writeback),
        ("fallocated", "fallocate", whole_fsync),
        ("reserve", "zeros", whole_fdatasync),
        ("reserve+cut", "zeros", whole_fdatasync_cut),
    ]
    console = Console()
    medians: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-flush-", dir=args.dir) as tmp:
        for name, how, write in variants:
            paths = _prepare(Path(tmp) / name, args.count, how)
            medians[name] = statistics.median(_timed(paths, write, gap_s=0.0015))
            console.print(f"{name:16s} {medians[name]:.2f} ms")
    table = Table(title=f"write + flush of {args.size} bytes, median of {args.count}")
    for column in ("file prepared as", "median ms", "÷ empty"):
        table.add_column(column)
    for name, value in medians.items():
        table.add_row(name, f"{value:.2f}", f"{value / medians['empty']:.2f}")
    console.print(table)
    result = {
        "benchmark": "flush",
        "size": args.size,
        "count": args.count,
        "median_ms": medians,
        "ratio_to_empty": {k: v / medians["empty"] for k, v in medians.items()},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
