"""Small-clinic learners side by side: the light learner (numpy head) vs FedHelp's torch small client.

Same seeds, same six simulated pneumonia clinics (``harness.flbench``, combined skew, capped sizes), same
rounds; both run through ``hub.training.simulation.run_federation``, so bytes are the codec's npz payloads a
real node uploads. For the four small clinics C–F it reports held-out AUC on each clinic's own (profiled)
test set and upload bytes per round:

- ``light``: ``bench fl``'s ``light_head`` method — the node's own light learner (shared head averaged by
  ``head_avg``, personal head kept) on the frozen backbone of a student the two hospitals trained; a clinic
  is scored with what its node serves (shared + personal head). ``light_start`` is that student before the
  rounds.
- ``fedhelp``: ``bench fl``'s ``fedhelp`` method without distillation; a small clinic trains the whole
  shared small model (plus its private and public heads) in torch and is scored with the global small model.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_learners.py --seeds 0,1 --rounds 3 \\
        --json out/bench-learners.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from harness.flbench.datasets import SMALL_CLINICS, build_bench_data
from harness.flbench.methods import BenchConfig, MethodContext, run_fedhelp, run_light_head


def run_seed(
    seed: int, cfg: BenchConfig, train_cap: int, test_cap: int, public: int, work: Path
) -> dict[str, Any]:
    """Both learners on one seed's clinics: per small clinic AUC and bytes per round, and seconds."""
    data = build_bench_data(
        "pneumonia",
        "combined",
        seed,
        max_train_per_clinic=train_cap,
        max_test=test_cap,
        public_size=public,
    )
    out: dict[str, Any] = {"seed": seed, "n_train": {c: data.clinics[c].n_train for c in SMALL_CLINICS}}
    t0 = time.perf_counter()
    light = run_light_head(data, MethodContext(cfg, work, seed))
    t1 = time.perf_counter()
    fedhelp = run_fedhelp(data, MethodContext(cfg, work, seed), distill=False)
    t2 = time.perf_counter()
    for name, res in (("light", light), ("fedhelp", fedhelp)):
        out[name] = {
            "auc": {c: res["clinics"][c]["auc"] for c in SMALL_CLINICS},
            "bytes_per_round": {c: res["bytes_per_client_round"][c] for c in SMALL_CLINICS},
            "unseen_auc": res["unseen"]["auc"],
        }
    out["light_start"] = {"auc": {c: light["extra"]["initial_auc"][c] for c in SMALL_CLINICS}}
    out["seconds"] = {"light": t1 - t0, "fedhelp": t2 - t1}
    return out


def _mean(runs: list[dict[str, Any]], learner: str, key: str, clinic: str) -> float:
    return statistics.fmean(r[learner][key][clinic] for r in runs)


def render(runs: list[dict[str, Any]], console: Console) -> None:
    seeds = ",".join(str(r["seed"]) for r in runs)
    table = Table(title=f"small clinics, pneumonia, seeds {seeds}: held-out AUC and upload bytes per round")
    for col in ("clinic", "train", "AUC start", "AUC light", "AUC fedhelp", "bytes light", "bytes fedhelp"):
        table.add_column(col, justify="right")
    for c in SMALL_CLINICS:
        table.add_row(
            c,
            f"{statistics.fmean(r['n_train'][c] for r in runs):.0f}",
            f"{_mean(runs, 'light_start', 'auc', c):.3f}",
            f"{_mean(runs, 'light', 'auc', c):.3f}",
            f"{_mean(runs, 'fedhelp', 'auc', c):.3f}",
            f"{_mean(runs, 'light', 'bytes_per_round', c):,.0f}",
            f"{_mean(runs, 'fedhelp', 'bytes_per_round', c):,.0f}",
        )
    table.add_row(
        "mean",
        "",
        *(
            f"{statistics.fmean(_mean(runs, k, 'auc', c) for c in SMALL_CLINICS):.3f}"
            for k in ("light_start", "light", "fedhelp")
        ),
        *(
            f"{statistics.fmean(_mean(runs, k, 'bytes_per_round', c) for c in SMALL_CLINICS):,.0f}"
            for k in ("light", "fedhelp")
        ),
    )
    console.print(table)
    secs = {k: statistics.fmean(r["seconds"][k] for r in runs) for k in ("light", "fedhelp")}
    console.print(
        f"seconds per seed (all six clinics, incl. the start student): light {secs['light']:.1f}, "
        f"fedhelp {secs['fedhelp']:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-cap", type=int, default=160, help="most training images per clinic")
    parser.add_argument("--test-cap", type=int, default=160, help="most test images per clinic")
    parser.add_argument("--public", type=int, default=96, help="public set size (FedHelp's soft labels)")
    parser.add_argument("--work", type=Path, default=None, help="folder for soft labels (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = BenchConfig(rounds=args.rounds)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        runs = [run_seed(s, cfg, args.train_cap, args.test_cap, args.public, work) for s in seeds]
    render(runs, Console())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": args.rounds, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
