"""The node-by-node reading of a training round (``hub.fl.update_audit``) on honest rounds of each strategy.

``fedclinic-hub rounds updates`` names a node whose update alone turns the round's mean round, is three
times too long or a quarter as long or shorter for the images it claims, or, where several pull the mean
far, agrees least with the others. Those rules were set on FedAvg's rounds (``bench_protection.py``),
where a clinic's optimiser steps grow with its images. Other strategies train otherwise: HSL takes as many
steps at a small clinic as its anchor set asks, FedProx pulls every update toward the global model, FedBN
and pFedNet keep parts of the model at home. Here every clinic is honest, so every node the reading names
is named wrongly; the table counts them by rule, beside the range each figure took.

Each method runs as ``bench fl`` runs it (``harness.flbench.methods``, the aug track, the six clinics of
the pneumonia benchmark); the answers of every ``weights_delta`` round are read just before the strategy
aggregates them, as the hub holds them.

    OMP_NUM_THREADS=1 FEDCLINIC_DATA=../shared/data .venv/bin/python bench/bench_reading.py \\
        --seeds 0,1,2 --methods fedavg,fedprox,fedbn,hsl,pfednet --rounds 6 --train-per-clinic 400
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_node.protocol.updates import UpdateKind
from harness.flbench.datasets import build_bench_data
from harness.flbench.methods import METHODS, BenchConfig, MethodContext
from hub.fl.errors import AggregationError
from hub.fl.strategy import ClientResult, Params
from hub.fl.update_audit import audit_updates

log = logging.getLogger("bench_reading")

#: What each rule's reason says (``UpdateAudit.named``), to count who was named by which rule.
RULES = {
    "turns": "point the other way",
    "too long": "(norm over √images",
    "too short": "claims far more images",
    "agrees least": "agrees least",
}

Rounds = list[dict[str, tuple[Params, float]]]


def read_rounds(rounds: Rounds) -> dict[str, Any]:
    """Every round's reading: nodes named per rule, rounds that could not be read together, and the range
    of ``keeps`` and of the length for its size over every node."""
    named = dict.fromkeys(RULES, 0)
    named_nodes: dict[str, int] = {}
    unreadable = 0
    keeps: list[float] = []
    sizes: list[float] = []
    node_rounds = 0
    for answers in rounds:
        try:
            audit = audit_updates(answers)
        except AggregationError:
            unreadable += 1
            continue
        node_rounds += len(audit.nodes)
        keeps += [n.keeps for n in audit.nodes if n.keeps is not None]
        sizes += [n.norm_for_size for n in audit.nodes if n.norm_for_size is not None]
        for node, reason in audit.named():
            named_nodes[node.node_id] = named_nodes.get(node.node_id, 0) + 1
            for rule, words in RULES.items():
                named[rule] += words in reason
    return {
        "rounds": len(rounds),
        "unreadable": unreadable,
        "node_rounds": node_rounds,
        "named": named,
        "named_nodes": named_nodes,
        "keeps_min": min(keeps) if keeps else None,
        "size_range": [min(sizes), max(sizes)] if sizes else None,
    }


def run_method(method: str, seed: int, args: argparse.Namespace, data: Any) -> dict[str, Any]:
    """One method on one seed: its test AUCs as ``bench fl`` scores them, and the reading of its rounds."""
    rounds: Rounds = []

    def record(rnd: int, kind: str, results: Sequence[ClientResult]) -> None:
        if kind == UpdateKind.WEIGHTS_DELTA.value:
            rounds.append({r.client_id: (r.update, float(r.num_examples)) for r in results})

    cfg = BenchConfig(rounds=args.rounds, augment=True)
    with tempfile.TemporaryDirectory() as out:
        ctx = MethodContext(cfg, Path(out), seed, on_results=record)
        result = METHODS[method](data, ctx)
    small = [result["clinics"][c]["auc"] for c in data.small]
    return {
        "method": method,
        "seed": seed,
        "small_clinic_auc": float(np.mean(small)),
        "reading": read_rounds(rounds),
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per method, summed over seeds, the honest nodes named by each rule."""
    lines = [
        "| method | weights_delta rounds | node-rounds read | named: turns | too long | too short "
        "| agrees least | who | not readable together | min keeps | × for size |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        reads = [r["reading"] for r in rows if r["method"] == method]
        who: dict[str, int] = {}
        for x in reads:
            for node, k in x["named_nodes"].items():
                who[node] = who.get(node, 0) + k
        keeps = [x["keeps_min"] for x in reads if x["keeps_min"] is not None]
        lows = [x["size_range"][0] for x in reads if x["size_range"]]
        highs = [x["size_range"][1] for x in reads if x["size_range"]]
        counts = " | ".join(str(sum(x["named"][rule] for x in reads)) for rule in RULES)
        lines.append(
            f"| {method} | {sum(x['rounds'] for x in reads)} | {sum(x['node_rounds'] for x in reads)} "
            f"| {counts} | {', '.join(f'{c} {k}' for c, k in sorted(who.items())) or '–'} "
            f"| {sum(x['unreadable'] for x in reads)} "
            f"| {f'{min(keeps):+.2f}' if keeps else '–'} "
            f"| {f'{min(lows):.2f} to {max(highs):.2f}' if lows else '–'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="fedavg,fedprox,fedbn,hsl,pfednet")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--train-per-clinic", type=int, default=400)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        data = build_bench_data(
            "pneumonia", "combined", seed, max_train_per_clinic=args.train_per_clinic, max_test=args.test
        )
        for method in methods:
            row = run_method(method, seed, args, data)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "args": vars(args)}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
