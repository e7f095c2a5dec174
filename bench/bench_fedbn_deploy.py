"""What a FedBN federation's model scores as it is deployed: with each clinic's own normalisation tensors
(what ``models from-round --kept-from M --node NODE`` builds), with the clinics' example-weighted mean (plain
``--kept-from M``: what a clinic that did not train gets), and with its starting model's (the aggregate alone,
what ``from-round`` published before the kept_tensors round existed, and now refuses).

The federation is ``bench fl``'s own ``fedbn`` method (six clinics, combined skew, BatchNorm ``fl_cnn``, the
augmented track, 12 rounds): every clinic is scored on its own test set at the threshold its validation split
picks, the unseen clinic at the pooled validation's (``harness.flbench``'s scorer).

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python bench/bench_fedbn_deploy.py --task pneumonia \\
        --seeds 205,206,207 --json out/bench-fedbn-deploy-pneumonia.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from harness.flbench.datasets import build_bench_data
from harness.flbench.methods import METHODS, BenchConfig, MethodContext

WAYS = ("own norms", "clinics' mean norms", "starting model's norms")


def _way(clinics: dict[str, float], unseen: float) -> dict[str, Any]:
    return {
        "clinics": clinics,
        "mean": statistics.fmean(clinics.values()),
        "worst": min(clinics.values()),
        "unseen": unseen,
    }


def deployed(task: str, seed: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Run ``bench fl``'s ``fedbn`` for one seed; its model deployed the three ways (its record scores each
    clinic with its own norms and the unseen clinic with the mean; ``extra`` holds the other two)."""
    data = build_bench_data(task, "combined", seed)
    ctx = MethodContext(BenchConfig(rounds=rounds), Path(tempfile.mkdtemp(prefix="fedbn-deploy-")), seed)
    raw = METHODS["fedbn"](data, ctx)
    extra, unseen = raw["extra"], raw["unseen"]["auc"]
    return {
        WAYS[0]: _way({c: m["auc"] for c, m in raw["clinics"].items()}, unseen),
        WAYS[1]: _way(extra["mean_norms_auc"], unseen),
        WAYS[2]: _way(extra["start_norms_auc"], extra["start_norms_unseen_auc"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pneumonia", choices=("pneumonia", "breast"))
    parser.add_argument("--seeds", default="205,206,207")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {seed: deployed(args.task, seed, args.rounds) for seed in seeds}
    table = Table(title=f"FedBN ({args.task}, six clinics, {args.rounds} rounds) deployed three ways: AUC")
    for col in ("norms", "clinic mean", "worst clinic", "unseen", "clinic mean − own (by seed)"):
        table.add_column(col, justify="right")
    for way in WAYS:
        diffs = [runs[s][way]["mean"] - runs[s][WAYS[0]]["mean"] for s in seeds]
        table.add_row(
            way,
            f"{statistics.fmean(runs[s][way]['mean'] for s in seeds):.3f}",
            f"{statistics.fmean(runs[s][way]['worst'] for s in seeds):.3f}",
            f"{statistics.fmean(runs[s][way]['unseen'] for s in seeds):.3f}",
            " ".join(f"{d:+.3f}" for d in diffs),
        )
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"task": args.task, "rounds": args.rounds, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
