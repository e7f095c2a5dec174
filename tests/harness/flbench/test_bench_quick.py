"""`fedclinic-lab bench fl --quick` through the real CLI: every method, finite metrics, resumable."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import hub.models.fl_cnn  # noqa: F401  (registers the student's model name)
from harness.cli import app
from harness.flbench.command import Skew, Task
from harness.flbench.datasets import SKEWS, TASKS
from harness.flbench.methods import METHODS
from harness.flbench.packages import package_versions
from harness.flbench.results import OURS
from harness.flbench.stress import STRESSES
from hub.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)  # every method and ablation, then a resume: > 10 min on a busy 2-core box
def test_bench_fl_quick_runs_every_method_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "fl", "--task", "pneumonia", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["methods"]) == set(METHODS)
    for name, summary in doc["methods"].items():
        for clinic in "ABCDEF":
            for metric in ("auc", "bacc", "sens"):
                assert math.isfinite(summary["clinics"][clinic][metric]["mean"]), (name, clinic, metric)
        assert math.isfinite(summary["unseen"]["auc"]["mean"]), name
        assert math.isfinite(summary["small_auc"]["mean"]) and math.isfinite(summary["worst_auc"]["mean"])
        assert math.isfinite(summary["panel_auc"]["mean"]) and len(summary["panel"]) >= 4
        assert summary["wall_s"]["mean"] > 0 and summary["steps"]["mean"] > 0
        pooled = ("local", "central", "local_aug", "central_aug", "central_aug_cons", "central_aug_rc_cons")
        federated = name not in pooled
        assert ("bytes_per_client_round" in summary) == federated, name
    assert {r["method"] for r in doc["records"]} == set(METHODS)
    for r in doc["records"]:  # every model is also scored on its clinics' validation images under stress
        assert set(r["stress_val"]) == set(STRESSES), r["method"]
    assert doc["targets"]["under_stress"]["best_strategy"] in OURS
    # every record names the versions its figures were made under, and the report names the one set
    assert doc["packages"] == [{"versions": package_versions(), "records": len(doc["records"])}]
    assert f"numpy {np.__version__}" in (out / "results.md").read_text()
    assert doc["targets"]["whole_val"]["best_strategy"] in OURS  # every strategy read on the whole split
    for r in doc["records"]:
        assert all(0.0 <= c["val_auc_whole"] <= 1.0 for c in r["clinics"].values()), r["method"]
    assert {c["name"] for c in doc["targets"]["checks"]} >= {
        "small AUC − fedavg_aug",
        "out-of-envelope panel AUC − fedavg_aug",
    }
    hsl = next(r for r in doc["records"] if r["method"] == "hsl")
    assert len(hsl["extra"]["anchor_auc"]) >= 6  # the mean anchor + single images of both classes
    # Beside the bench's choice, what the product's HSL deploys (its last round, as every strategy in
    # hub.fl), scored the same way: the same model where both agree.
    assert hsl["extra"]["product_round"] == 2.0
    if hsl["extra"]["product_round"] == hsl["extra"]["best_round"]:
        assert hsl["extra"]["product_round_small_auc"] == pytest.approx(hsl["small_auc"])
        assert hsl["extra"]["product_round_worst_auc"] == pytest.approx(hsl["worst_auc"])
        assert hsl["extra"]["product_round_panel_auc"] == pytest.approx(hsl["panel_mean"]["auc"])
    for r in doc["records"]:  # one global model → its best round on validation; the others: their last
        one_model = (
            "fedavg",
            "fedprox",
            "fedavg_aug",
            "fedavg_aug_cons",
            "fedavg_aug_rc",
            "fedavg_aug_rc_cons",
            "central",
            "central_aug",
            "central_aug_cons",
            "central_aug_rc_cons",
            "fedavg_hslsteps",
            "fedavg_adabn",
            "fedavg_aug_ft",  # the best round of its federation, then fine-tuned at each clinic
            "ditto_aug",  # the best round of its federation for the unseen clinics; personal models at each
            "ditto_rc_cons",
            "fedavg_aug_tail",  # the rounds' readings; the model deployed is the mean of the last rounds'
            "fedavg_aug_rc_cons_tail",
            "fedavg_aug_tta",  # the round kept on plain readings; every clinic reads it over augmented views
            "fedavg_aug_rc_cons_tta",
            "fedavg_aug_sam",  # trained with sharpness-aware steps, its round kept on validation as FedAvg's
            "fedavg_aug_rc_cons_sam",
        )
        if r["method"].endswith("_tail"):
            assert r["extra"]["tail_rounds"] == ([2, 3] if r["method"].startswith("pfednet") else [1, 2])
            far = r["extra"]["tail_distances"]  # one step within the two-round tail, the mean half of it
            assert len(far["steps"]) == 1 and far["mean_to_last"] == pytest.approx(far["steps"][0] / 2)
        if r["method"].endswith("_ft"):
            assert set(r["extra"]["finetune_epochs"]) == set(r["clinics"]), r["method"]
        if r["method"] in one_model or r["method"].startswith("hsl"):
            assert 1 <= r["extra"]["best_round"] <= 2, r["method"]
        else:
            assert "best_round" not in r["extra"], r["method"]
    distill = next(r for r in doc["records"] if r["method"] == "fedhelp")["extra"]["distill"]
    assert distill["student_params"] <= 1_000_000
    student = load_checkpoint(out / distill["checkpoint"]).build_model()  # what `fedclinic-hub export` reads
    assert sum(p.numel() for p in student.parameters()) == distill["student_params"]
    assert (out / "results.md").read_text().startswith("# bench fl")
    assert (out / "auc.png").stat().st_size > 10_000
    assert (out / "foundation-corpus-pneumonia-96.npz").is_file()
    quality = json.loads((out / "foundation-corpus-pneumonia-96.json").read_text())["quality_held_out"]
    assert {"accuracy", "auc", "ece"} <= set(quality)
    fedhelp = next(r for r in doc["records"] if r["method"] == "fedhelp")
    assert fedhelp["extra"]["foundation"] == quality
    assert "hsl − hsl_noanchor" in doc["targets"]["ablations"]
    # AdaBN changes what the unseen clinics see and nothing else: the clinics that trained score the same.
    by = {r["method"]: r for r in doc["records"]}
    for adapted, plain in (("fedbn_adabn", "fedbn"), ("fedavg_adabn", "fedavg")):
        assert by[adapted]["clinics"] == by[plain]["clinics"]
        assert by[adapted]["panel"] != by[plain]["panel"]
        assert f"{adapted} − {plain}" in doc["targets"]["ablations"]

    # FedBN's record says what its kept norms are worth: each clinic with the clinics' mean norms and with
    # the starting model's (its aggregate alone), scored as its own-norm clinics are.
    kept = by["fedbn"]["extra"]
    assert set(kept["mean_norms_auc"]) == set(kept["start_norms_auc"]) == set("ABCDEF")
    assert kept["start_norms_auc"] != {c: m["auc"] for c, m in by["fedbn"]["clinics"].items()}
    assert math.isfinite(kept["start_norms_unseen_auc"])
    assert "mean_norms_auc" not in by["fedavg"].get("extra", {})  # FedAvg keeps nothing at the clinics
    # pFedNet on BatchNorm keeps each clinic's statistics: its clinics score unlike the GroupNorm net's.
    assert by["pfednet_bn"]["extra"]["norm"] == "batch" and by["pfednet"]["extra"]["norm"] == "group"
    assert by["pfednet_bn"]["clinics"] != by["pfednet"]["clinics"]
    assert "pfednet_bn − pfednet_bn_nograph" in doc["targets"]["ablations"]
    # The agreement across augmented views and the random convolutions change what the clinics learn; each
    # has its row.
    for agreeing, plain in (
        ("fedavg_aug_cons", "fedavg_aug"),
        ("pfednet_cons", "pfednet"),
        ("fedavg_aug_rc", "fedavg_aug"),
        ("pfednet_bn_rc_cons", "pfednet_bn_cons"),
        ("fedavg_aug_ft", "fedavg_aug"),
        ("pfednet_rc_cons_ft", "pfednet_rc_cons"),
        ("ditto_aug", "fedavg_aug"),
        ("ditto_rc_cons", "fedavg_aug_rc_cons"),
        # Each tail-averaged, test-time-augmented or sharpness-aware method against the plain method it is
        # built on.
        *((m, m.rsplit("_", 1)[0]) for m in METHODS if m.endswith(("_tail", "_tta", "_sam"))),
    ):
        assert by[agreeing]["clinics"] != by[plain]["clinics"]
        assert f"{agreeing} − {plain}" in doc["targets"]["ablations"]
    # Ditto's federation is FedAvg's to the bit: its global model scores each clinic as FedAvg's does.
    for ditto, fedavg in (("ditto_aug", "fedavg_aug"), ("ditto_rc_cons", "fedavg_aug_rc_cons")):
        assert by[ditto]["extra"]["global_auc"] == {c: m["auc"] for c, m in by[fedavg]["clinics"].items()}
        assert by[ditto]["unseen"] == by[fedavg]["unseen"] and by[ditto]["panel"] == by[fedavg]["panel"]

    # Methods with one deployable model count each place's test images outside that model's envelope.
    deployable = {
        "central",
        "central_aug",
        "central_aug_cons",
        "central_aug_rc_cons",
        "fedavg",
        "fedprox",
        "fedavg_aug",
        "fedavg_aug_cons",
        "fedavg_aug_rc",
        "fedavg_aug_rc_cons",
        "fedavg_aug_tail",
        "fedavg_aug_rc_cons_tail",
        "fedavg_aug_tta",
        "fedavg_aug_rc_cons_tta",
        "fedavg_aug_sam",
        "fedavg_aug_rc_cons_sam",
        "fedavg_hslsteps",
    }
    assert {m for m, r in by.items() if "envelope" in r} == deployable
    env = by["fedavg_aug"]["envelope"]
    assert set(env["clinics"]) == set("ABCDEF") and set(env["panel"]) == set(by["fedavg_aug"]["panel"])
    for count in [*env["clinics"].values(), env["unseen"], *env["panel"].values()]:
        assert 0 <= count["outside"] <= count["n"] and count["n"] > 0
        # A node counts an image outside either part; only images outside the grey-value part look negative.
        assert max(count["embedding"], count["intensity"]) <= count["outside"]
        assert count["outside"] <= count["embedding"] + count["intensity"]
        assert count["negative"] <= count["intensity"]
    assert sum(c["outside"] for c in env["panel"].values()) > 0  # the panel is unlike the training images
    # The grey-value part is the model's input alone: every deployable method sees the same counts.
    assert (
        by["central_aug"]["envelope"]["panel"]["inverted"]["intensity"]
        == env["panel"]["inverted"]["intensity"]
    )
    summary = doc["methods"]["fedavg_aug"]["envelope"]
    rates = summary["rate"]
    assert rates["A"]["mean"] == env["clinics"]["A"]["outside"] / env["clinics"]["A"]["n"]
    assert set(summary["parts"]) == set(rates) and summary["expected"] == pytest.approx(0.02)
    # And for the envelope the product ships: fitted on the hub's raw validation split, not the clinics'.
    assert set(env["hub"]["clinics"]) == set("ABCDEF") and set(env["hub"]["panel"]) == set(env["panel"])
    assert env["hub"]["unseen"]["n"] == env["unseen"]["n"]
    assert set(summary["hub"]["rate"]) == set(rates)
    report = (out / "results.md").read_text()
    assert "Input envelope" in report and "look like negatives" in report
    assert "as `fedclinic-hub export` ships it today" in report

    # --resume reuses every finished (method, seed) and rewrites the same reports.
    again = runner.invoke(
        app, ["bench", "fl", "--task", "pneumonia", "--quick", "--resume", "--out", str(out)]
    )
    assert again.exit_code == 0, again.output
    assert again.output.count("(cached)") == len(METHODS)
    redo = json.loads((out / "results.json").read_text())
    assert redo["records"] == doc["records"]

    # --report-only merges finished runs (e.g. from several processes) without training anything.
    (out / "results.json").unlink()
    merged = runner.invoke(
        app,
        [
            "bench",
            "fl",
            "--quick",
            "--report-only",
            "--methods",
            "fedavg,hsl",
            "--out",
            str(out),
            "--format",
            "json",
        ],
    )
    assert merged.exit_code == 0, merged.output
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"fedavg", "hsl"}
    assert json.loads(merged.stdout) == json.loads((out / "results.json").read_text())


def test_bench_fl_rejects_unknown_method_task_and_skew_naming_the_valid_ones(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "fl", "--methods", "fedsgd", "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert "unknown methods" in res.output
    res = runner.invoke(
        app, ["bench", "fl", "--task", "cifar", "--out", str(tmp_path)], env={"COLUMNS": "300"}
    )
    assert res.exit_code == 2 and "pneumonia" in res.output and "breast" in res.output
    res = runner.invoke(
        app, ["bench", "fl", "--skew", "wild", "--out", str(tmp_path)], env={"COLUMNS": "300"}
    )
    assert res.exit_code == 2 and "combined" in res.output and "quantity" in res.output


def test_bench_fl_rejects_an_unknown_pfednet_personal_part_or_graph(tmp_path: Path) -> None:
    runner = CliRunner()
    for option, value, valid in (
        ("--pfednet-personal", "all", "last_block"),
        ("--pfednet-graph", "random", "labels+features"),
    ):
        res = runner.invoke(
            app, ["bench", "fl", option, value, "--out", str(tmp_path)], env={"COLUMNS": "300"}
        )
        assert res.exit_code == 2 and valid in res.output
    assert not (tmp_path / "cache").exists()


def test_task_and_skew_choices_match_the_benchmark_tables() -> None:
    assert sorted(t.value for t in Task) == sorted(TASKS)
    assert [s.value for s in Skew] == list(SKEWS)


def test_bench_fl_rejects_a_bad_clinics_or_profiles_file_before_training(tmp_path: Path) -> None:
    bad = tmp_path / "clinics.toml"
    bad.write_text("[[clinic]]\nname = 'A'\n")
    runner = CliRunner()
    res = runner.invoke(
        app, ["bench", "fl", "--clinics", str(bad), "--out", str(tmp_path / "o")], env={"COLUMNS": "300"}
    )
    assert res.exit_code == 2 and "at least two" in res.output
    res = runner.invoke(
        app,
        ["bench", "fl", "--profiles", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")],
        env={"COLUMNS": "300"},
    )
    assert res.exit_code == 2 and "does not exist" in res.output
    assert not (tmp_path / "o").exists()
