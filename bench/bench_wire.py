"""The benchmark over the wire against the simulation: same seeds, same method, same rounds.

For each seed, a ``bench fl`` method (six clinics, combined skew) runs twice: (a) the simulation, the method's
own code; (b) over the wire: ``fedclinic-hub init`` + ``serve`` (HTTPS on loopback, SQLite), six
``fedclinic-edge serve`` nodes that imported their clinic's training images as labeled DICOM, rounds through
``fedclinic-hub rounds start``: ``--strategy head_avg`` for ``light_head`` (pneumonia; the node's numpy
learner), ``--strategy pfednet`` for ``pfednet``, ``pfednet_cons`` and ``pfednet_rc_cons`` and their
BatchNorm variants ``pfednet_bn``, ``pfednet_bn_cons`` and ``pfednet_bn_rc_cons`` (either task; the torch
learner; on BatchNorm a ``kept_tensors`` round collects the nodes' running statistics before the models are
built). Both are scored by the benchmark's scorer: small-clinic mean AUC, worst clinic, unseen clinic
and the out-of-envelope panel mean, with update bytes per clinic per round and wall time.
``harness.wirebench.comparison`` says how the two are told apart.

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python bench/bench_wire.py --seeds 0,1,2 --rounds 3 --quick \\
        --json out/bench-wire.json
    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python bench/bench_wire.py --method pfednet_rc_cons \\
        --task breast --seeds 195 --rounds 12 --json out/bench-wire-pfednet.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from harness.flbench.methods import BenchConfig
from harness.wirebench.comparison import METRIC_KEYS, QUICK, Caps, SeedComparison, compare_seed, summarize
from harness.wirebench.pfednet_wire import PFEDNET_WIRE

LABELS = {
    "small_auc": "small-clinic mean AUC",
    "worst_auc": "worst-clinic AUC",
    "unseen_auc": "unseen clinic AUC (in envelope)",
    "panel_auc": "unseen panel mean AUC (out of envelope)",
}


def render(rows: list[SeedComparison], console: Console, method: str, task: str) -> None:
    table = Table(title=f"{method}, {task}, six clinics: simulation vs over the wire")
    for col in ("seed", "metric", "sim", "wire", "wire − sim"):
        table.add_column(col, justify="right")
    for row in rows:
        for key, pair in row.metrics().items():
            table.add_row(
                str(row.seed), LABELS[key], f"{pair['sim']:.4f}", f"{pair['wire']:.4f}",
                f"{pair['wire'] - pair['sim']:+.1e}",
            )  # fmt: skip
    for key, s in summarize(rows).items():
        sd = "" if math.isnan(s["sim_seed_sd"]) else f" (seed SD {s['sim_seed_sd']:.4f})"
        table.add_row("mean", LABELS[key], f"{s['sim']:.4f}{sd}", f"{s['wire']:.4f}", f"{s['diff']:+.1e}")
    console.print(table)
    bytes_table = Table(title="update bytes per clinic per round (payload)")
    clinics = list(rows[0].sim["bytes_per_client_round"])
    for col in ("side", *clinics):
        bytes_table.add_column(col, justify="right")
    for side in ("sim", "wire"):
        per = [
            statistics.fmean(r.to_json()[f"{side}_bytes_per_client_round"][c] for r in rows) for c in clinics
        ]
        bytes_table.add_row(side, *(f"{b:,.0f}" for b in per))
    console.print(bytes_table)
    for row in rows:
        gaps = ", ".join(f"{k}: {v}" for k, v in row.tensor_gap.items())
        secs = ", ".join(f"{k} {v:.0f} s" for k, v in row.seconds.items())
        console.print(f"seed {row.seed}: max |replay − wire| {gaps}\n  wall: {secs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--method", default="light_head", choices=["light_head", *PFEDNET_WIRE])
    parser.add_argument("--task", default="pneumonia", choices=["pneumonia", "breast"])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="bench fl --quick's caps (160 train, 160 test)")
    parser.add_argument("--work", type=Path, default=None, help="keep the processes' folders here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = BenchConfig(rounds=args.rounds, local_epochs=args.local_epochs)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    caps = QUICK if args.quick else Caps()
    console = Console()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = [
            compare_seed(
                s, cfg, work / f"seed{s}", caps=caps, method=args.method, task=args.task, on_step=console.log
            )
            for s in seeds
        ]
    render(rows, console, args.method, args.task)
    console.print(f"total wall {time.perf_counter() - t0:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "method": args.method,
            "task": args.task,
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "quick": args.quick,
            "seeds": [r.to_json() for r in rows],
            "summary": summarize(rows),
            "metrics": list(METRIC_KEYS),
        }
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
