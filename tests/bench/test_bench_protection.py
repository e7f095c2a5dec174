"""bench/bench_protection.py: the node-side DP clip is chosen on validation, and the test split is read only
by the reported runs.

Real data (PneumoniaMNIST from ``FEDCLINIC_DATA``), at sizes that keep a run to seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from harness.flbench.methods import validation_aucs
from tests.support.bench_script import load_bench_script

TINY = ["--rounds", "2", "--train-per-clinic", "40", "--test", "60", "--secagg-nodes", "2"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench_script("bench_protection")


def _args() -> argparse.Namespace:
    """What ``choose_light_clips`` reads of the command line, at the tiny sizes."""
    return argparse.Namespace(rounds=2, train_per_clinic=40, test=60)


def test_the_clip_grid_reads_numbers_and_the_median_rule(bench: ModuleType) -> None:
    assert bench.parse_clip_grid("0.01, 0.2,median") == ["0.01", "0.2", "median"]
    for bad in ("0.05,-1", "0.05,0", "fast", ""):
        with pytest.raises(ValueError):
            bench.parse_clip_grid(bad)
    assert bench.clip_value("0.05", None) == 0.05
    assert bench.clip_value("median", 1.78) == 1.78
    with pytest.raises(ValueError, match="light_plain"):
        bench.clip_value("median", None)


def test_delta_is_paired_by_seed_against_the_reference(bench: ModuleType) -> None:
    rows = [
        {"config": "light_plain", "seed": 0, "small_clinic_auc": 0.80},
        {"config": "light_plain", "seed": 1, "small_clinic_auc": 0.90},
        {"config": "light_dp_eps8", "seed": 1, "small_clinic_auc": 0.85},
        {"config": "light_dp_eps8", "seed": 0, "small_clinic_auc": 0.81},
        {"config": "light_dp_eps8", "seed": 2, "small_clinic_auc": 0.10},  # no reference on seed 2
        {"config": "plain", "seed": 0, "small_clinic_auc": 0.50},
    ]
    d = bench.paired_delta(rows, "light_dp_eps8", "small_clinic_auc")
    assert d == pytest.approx({0: 0.01, 1: -0.05})


def test_a_tie_on_the_small_clinics_goes_to_all_clinics_then_to_the_earlier_entry(bench: ModuleType) -> None:
    def score(small: float, mean: float) -> dict[str, float]:
        return {"small_clinic_val_auc": small, "mean_clinic_val_auc": mean}

    grid = ["0.01", "0.02", "median"]
    scores = {"0.01": score(0.90, 0.95), "0.02": score(0.90, 0.97), "median": score(0.80, 0.99)}
    assert bench.best_on_validation(scores, grid) == "0.02"
    scores["median"] = score(0.91, 0.50)
    assert bench.best_on_validation(scores, grid) == "median"
    # equal up to a float's last digit: the earlier entry
    scores = {"0.01": score(0.9425, 0.9569733333333332), "0.02": score(0.9425, 0.9569733333333333)}
    assert bench.best_on_validation(scores, ["0.01", "0.02"]) == "0.01"


def test_tuning_reads_validation_only_and_picks_the_best_small_clinic_validation_auc(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_test(*_: Any, **__: Any) -> Any:
        raise AssertionError("a tuning run read the test split")

    monkeypatch.setattr(bench, "evaluate", no_test)
    scored: list[dict[str, float]] = []

    def recording(data: Any, per_clinic: Any) -> dict[str, float]:
        out = validation_aucs(data, per_clinic)
        scored.append(out)
        return out

    monkeypatch.setattr(bench, "validation_aucs", recording)
    args = _args()
    grid = ["0.01", "0.2", "median"]
    sel = bench.choose_light_clips(["light_dp_eps1", "light_dp_eps8"], grid, [100], args)
    # light_plain, then 2 configurations × 3 clips, each scored once on validation
    assert len(scored) == 7 and all(set(s) == {"A", "B", "C", "D", "E", "F"} for s in scored)
    plain = sel["rows"][0]
    assert plain["config"] == "light_plain" and "small_clinic_auc" not in plain
    for name in ("light_dp_eps1", "light_dp_eps8"):
        by = sel["scores"][name]
        best = max(by[g]["small_clinic_val_auc"] for g in grid)
        assert by[sel["chosen"][name]]["small_clinic_val_auc"] == best
        # the median rule is the plain run's median head-delta norm on the same seed
        assert by["median"]["clips"] == [plain["median_update_norm"]]
        small = [s for s, r in zip(scored[1:], sel["rows"][1:], strict=True) if r["config"] == name]
        got = [float(np.nanmean([s[c] for c in ("C", "D", "E", "F")])) for s in small]
        assert got == pytest.approx([by[g]["small_clinic_val_auc"] for g in grid])


def test_reported_runs_use_the_chosen_clip_and_report_validation_beside_test(
    bench: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "run.json"
    argv = ["--seeds", "0", "--configs", "light_plain,light_dp_eps8", *TINY, "--json", str(out)]
    argv += ["--light-clip-grid", "0.05,median", "--tune-seeds", "100"]
    assert bench.main(argv) == 0
    run = json.loads(out.read_text())
    sel = run["clip_selection"]
    rule = sel["chosen"]["light_dp_eps8"]
    plain, dp = run["rows"]
    assert plain["config"] == "light_plain" and dp["config"] == "light_dp_eps8"
    assert dp["clip_rule"] == rule
    assert dp["clip_norm"] == (plain["median_update_norm"] if rule == "median" else float(rule))
    assert dp["epsilon_spent"] == pytest.approx(8.0, rel=1e-6)
    for row in (plain, dp):
        for key in ("mean_clinic_auc", "small_clinic_auc", "mean_clinic_val_auc", "small_clinic_val_auc"):
            assert 0.0 <= row[key] <= 1.0


def test_a_tuning_seed_may_not_be_reported(bench: ModuleType) -> None:
    argv = ["--seeds", "0,100", "--configs", "light_plain,light_dp_eps8", *TINY]
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--light-clip-grid", "0.05", "--tune-seeds", "100"])
    assert exc.value.code == 2


def test_every_round_is_read_node_by_node_with_the_attackers_marked(
    bench: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "audit.json"
    configs = "plain,flip_fedavg,pair_fedavg,poison_audited,inflate_fedavg,stall_fedavg,secagg"
    assert bench.main(["--seeds", "0", "--configs", configs, *TINY, "--json", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert "audit" not in rows["secagg"]  # the hub holds only the sum
    plain, flip, pair = rows["plain"]["audit"], rows["flip_fedavg"]["audit"], rows["pair_fedavg"]["audit"]
    assert (plain["attackers"], flip["attackers"], pair["attackers"]) == ([], ["A"], ["C", "D"])
    assert plain["rounds"] == 2 and len(plain["nodes"]) == 2 * 6
    # The same learners, seed and first round: A's update flipped at its own norm, C's and D's ×−10.
    first = {n["node_id"]: n for n in plain["nodes"] if n["round"] == 1}
    flipped = {n["node_id"]: n for n in flip["nodes"] if n["round"] == 1}
    paired = {n["node_id"]: n for n in pair["nodes"] if n["round"] == 1}
    assert flipped["A"]["norm"] == pytest.approx(first["A"]["norm"], rel=1e-5)
    for c in "CD":
        assert paired[c]["norm"] == pytest.approx(10 * first[c]["norm"], rel=1e-5)
    # F claims 100× its images with its own update, or 1,000× with its update ×0.01.
    inflated = {n["node_id"]: n for n in rows["inflate_fedavg"]["audit"]["nodes"] if n["round"] == 1}
    stalled = {n["node_id"]: n for n in rows["stall_fedavg"]["audit"]["nodes"] if n["round"] == 1}
    assert (inflated["F"]["examples"], stalled["F"]["examples"]) == (
        100 * first["F"]["examples"],
        1_000 * first["F"]["examples"],
    )
    assert inflated["F"]["norm"] == pytest.approx(first["F"]["norm"], rel=1e-5)
    assert stalled["F"]["norm"] == pytest.approx(0.01 * first["F"]["norm"], rel=1e-4)
    # What the audited mean reads is what the table counts.
    table = bench.audit_table([r for r in rows.values() if "audit" in r])
    assert "| pair_fedavg | 2 | C " in table and "| plain | 2 | – |" in table
