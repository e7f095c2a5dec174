"""What a FedBN federation's model scores as it is deployed: with each clinic's own normalisation tensors
(what ``models from-round --kept-from M --node NODE`` builds), with the clinics' example-weighted mean (plain
``--kept-from M``: what a clinic that did not train gets), and with its starting model's (the aggregate alone,
what ``from-round`` published before the kept_tensors round existed, and now refuses).

The federation is ``bench fl``'s ``fedbn`` (six clinics, combined skew, BatchNorm ``fl_cnn``, the augmented
track, 12 rounds): the same strategy, learners and seeds; every clinic is scored on its own test set at the
threshold its validation split picks, the unseen clinic at the pooled validation's (``harness.flbench``'s
scorer).

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
from harness.flbench.methods import (
    BenchConfig,
    MethodContext,
    _clinics_mean,
    _local_cfg,
    _predictor,
    _seeded,
    evaluate,
)
from hub.fl.registry import make_strategy
from hub.models.fl_cnn import fl_cnn
from hub.training.learners import SupervisedLearner, load_params, to_params
from hub.training.simulation import run_federation

WAYS = ("own norms", "clinics' mean norms", "starting model's norms")


def deployed(task: str, seed: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Train ``bench fl``'s FedBN for one seed; score its model deployed the three ways."""
    data = build_bench_data(task, "combined", seed)
    cfg = BenchConfig(rounds=rounds)
    ctx = MethodContext(cfg, Path(tempfile.mkdtemp(prefix="fedbn-deploy-")), seed)
    local = _local_cfg(ctx, augment=cfg.augment)
    outputs = data.spec.num_outputs
    init = _seeded(seed, lambda: fl_cnn(norm="batch", num_outputs=outputs))
    strategy = make_strategy("fedbn", client_config={"augment": local.augment})
    learners = {}
    for k, c in enumerate(data.names):
        model = fl_cnn(norm="batch", num_outputs=outputs)
        model.load_state_dict(init.state_dict())
        learners[c] = SupervisedLearner(c, model, data.clinics[c], local, seed * 100 + k)
    strategy.initialize(to_params(init), list(data.names))
    run_federation(strategy, learners, rounds)
    shared = strategy.global_params
    kept = [n for n in to_params(init) if n not in shared]
    for learner in learners.values():
        load_params(learner.model, shared)
    mean = fl_cnn(norm="batch", num_outputs=outputs)
    load_params(mean, _clinics_mean(learners, data, kept))
    load_params(mean, shared)
    start = fl_cnn(norm="batch", num_outputs=outputs)
    start.load_state_dict(init.state_dict())
    load_params(start, shared)
    ways = {
        WAYS[0]: ({c: _predictor(lr.model) for c, lr in learners.items()}, _predictor(mean)),
        WAYS[1]: (dict.fromkeys(data.names, _predictor(mean)), _predictor(mean)),
        WAYS[2]: (dict.fromkeys(data.names, _predictor(start)), _predictor(start)),
    }
    out = {}
    for way, (per_clinic, unseen) in ways.items():
        scored = evaluate(data, per_clinic, unseen)
        clinics = {c: m["auc"] for c, m in scored["clinics"].items()}
        out[way] = {
            "clinics": clinics,
            "mean": statistics.fmean(clinics.values()),
            "worst": min(clinics.values()),
            "unseen": scored["unseen"]["auc"],
        }
    return out


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
