"""Results: derived columns, seed-paired target checks (exact on synthetic records), markdown."""

from __future__ import annotations

from typing import Any

import pytest

from harness.flbench.results import build_results, finalize_record, render_markdown, targets


def _raw(
    aucs: list[float], unseen: float, bytes_up: float | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "clinics": {c: {"auc": a, "bacc": a - 0.1} for c, a in zip("ABCDEF", aucs, strict=True)},
        "unseen": {"auc": unseen, "bacc": unseen - 0.1},
    }
    if bytes_up is not None:
        raw["bytes_per_client_round"] = dict.fromkeys("ABCDEF", bytes_up)
    if extra is not None:
        raw["extra"] = extra
    return raw


def test_finalize_record_small_clinic_mean_and_worst() -> None:
    r = finalize_record("x", 0, _raw([0.9, 0.8, 0.7, 0.6, 0.5, 0.95], 0.8, 100.0), 3.0, {})
    assert r["small4_auc"] == pytest.approx((0.7 + 0.6 + 0.5 + 0.95) / 4)
    assert (r["worst_auc"], r["worst_clinic"]) == (0.5, "E")
    assert r["mean_bytes_per_client_round"] == 100.0


def _records() -> list[dict[str, Any]]:
    recs = []
    for seed, bump in ((0, 0.0), (1, 0.02)):
        recs += [
            finalize_record("central", seed, _raw([0.9] * 6, 0.80 + bump), 1, {}),
            finalize_record("local", seed, _raw([0.8] * 6, 0.70), 1, {}),
            finalize_record(
                "fedavg",
                seed,
                _raw([0.85, 0.85, 0.85, 0.85, 0.70, 0.85], 0.6),
                1,
                {},
            ),
            finalize_record("hsl", seed, _raw([0.88] * 6, 0.78, bytes_up=1000.0), 1, {}),
            finalize_record(
                "fedhelp",
                seed,
                _raw(
                    [0.89] * 6,
                    0.79,
                    bytes_up=40.0,
                    extra={
                        "distill": {
                            "gap": 0.005 + bump,
                            "teacher": "t",
                            "teacher_params": 2,
                            "student_params": 1,
                            "teacher_mean_clinic_auc": 0.9,
                            "student_mean_clinic_auc": 0.9,
                        }
                    },
                ),
                1,
                {},
            ),
        ]
    return recs


def test_targets_are_paired_by_seed_with_the_best_strategy() -> None:
    tg = targets(_records())
    assert tg["best_strategy"] == "fedhelp"
    checks = {c["name"]: c for c in tg["checks"]}
    ratio = checks["small4 AUC / centralized"]
    assert ratio["per_seed"] == pytest.approx([0.89 / 0.9, 0.89 / 0.9])
    assert ratio["status"] == "met"
    assert checks["small4 AUC − local-only"]["per_seed"] == pytest.approx([0.09, 0.09])
    assert checks["worst AUC − FedAvg worst"]["per_seed"] == pytest.approx([0.19, 0.19])
    assert checks["worst AUC − centralized worst"]["per_seed"] == pytest.approx([-0.01, -0.01])
    unseen = checks["unseen AUC / centralized"]
    assert unseen["per_seed"] == pytest.approx([0.79 / 0.80, 0.79 / 0.82])
    assert checks["teacher − student mean AUC"]["per_seed"] == pytest.approx([0.005, 0.025])
    assert checks["teacher − student mean AUC"]["seeds_passing"] == 1
    assert checks["teacher − student mean AUC"]["status"] == "missed"  # mean 0.015 > 0.01
    upload = checks["FedHelp upload / HSL upload per clinic per round"]
    assert upload["per_seed"] == pytest.approx([0.04, 0.04]) and upload["status"] == "met"


def test_markdown_lists_every_method_and_target() -> None:
    meta = {
        "task": "pneumonia",
        "skew": "combined",
        "seeds": [0, 1],
        "rounds": 12,
        "local_epochs": 1,
        "quick": False,
    }
    results = build_results(_records(), meta)
    md = render_markdown(results)
    for m in ("central", "local", "fedavg", "hsl", "fedhelp"):
        assert f"| {m} |" in md
    assert "small4 AUC / centralized" in md and "best fedclinic strategy by small4: **fedhelp**" in md
