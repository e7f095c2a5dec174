"""Results: derived columns, seed-paired target checks (exact on synthetic records), markdown."""

from __future__ import annotations

from typing import Any

import pytest

from harness.flbench.results import build_results, finalize_record, render_markdown, targets

#: What a bench run records about itself (results.json "meta"), for the reports built here.
META = {
    "task": "pneumonia",
    "skew": "combined",
    "seeds": [0, 1],
    "rounds": 12,
    "local_epochs": 1,
    "quick": False,
}


def _raw(
    aucs: list[float],
    unseen: float,
    bytes_up: float | None = None,
    extra: dict[str, Any] | None = None,
    val: float | None = None,
) -> dict[str, Any]:
    """Synthetic raw metrics; validation AUC ``val`` (default: the test AUC) and a two-profile panel."""
    raw: dict[str, Any] = {
        "clinics": {
            c: {"auc": a, "bacc": a - 0.1, "sens": a - 0.2, "val_auc": a if val is None else val}
            for c, a in zip("ABCDEF", aucs, strict=True)
        },
        "small": list("CDEF"),
        "unseen": {"auc": unseen, "bacc": unseen - 0.1},
        "panel": {"p1": {"auc": unseen - 0.1}, "p2": {"auc": unseen - 0.2}},
        "panel_mean": {"auc": unseen - 0.15},
    }
    if bytes_up is not None:
        raw["bytes_per_client_round"] = dict.fromkeys("ABCDEF", bytes_up)
    if extra is not None:
        raw["extra"] = extra
    return raw


def test_finalize_record_small_clinic_mean_and_worst() -> None:
    r = finalize_record("x", 0, _raw([0.9, 0.8, 0.7, 0.6, 0.5, 0.95], 0.8, 100.0), 3.0, {}, steps=42)
    assert r["small_auc"] == pytest.approx((0.7 + 0.6 + 0.5 + 0.95) / 4)
    assert r["small_sens"] == pytest.approx((0.7 + 0.6 + 0.5 + 0.95) / 4 - 0.2)
    assert (r["worst_auc"], r["worst_clinic"]) == (0.5, "E")
    assert r["mean_bytes_per_client_round"] == 100.0
    assert r["steps"] == 42 and r["panel_mean"]["auc"] == pytest.approx(0.65)


def test_small_clinics_come_from_the_setting_not_a_fixed_six() -> None:
    raw = _raw([0.9, 0.8, 0.7, 0.6, 0.5, 0.95], 0.8)
    raw["small"] = ["A", "F"]
    assert finalize_record("x", 0, raw, 1.0, {})["small_auc"] == pytest.approx((0.9 + 0.95) / 2)


def _records() -> list[dict[str, Any]]:
    recs = []
    for seed, bump in ((0, 0.0), (1, 0.02)):
        recs += [
            finalize_record("central_aug", seed, _raw([0.9] * 6, 0.80 + bump), 1, {}),
            finalize_record("local_aug", seed, _raw([0.8] * 6, 0.70), 1, {}),
            finalize_record("fedavg_aug", seed, _raw([0.85, 0.85, 0.85, 0.85, 0.70, 0.85], 0.6), 1, {}),
            # hsl has the best *test* AUC but the worse validation AUC: selection must not pick it.
            finalize_record("hsl", seed, _raw([0.95] * 6, 0.78, bytes_up=1000.0, val=0.7), 1, {}),
            finalize_record(
                "fedhelp",
                seed,
                _raw(
                    [0.89] * 6,
                    0.79,
                    bytes_up=40.0,
                    val=0.9,
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


def test_targets_are_paired_by_seed_with_the_strategy_chosen_on_validation() -> None:
    tg = targets(_records())
    assert tg["best_strategy"] == "fedhelp"  # higher validation AUC, lower test AUC than hsl
    checks = {c["name"]: c for c in tg["checks"]}
    assert checks["small AUC − central_aug"]["per_seed"] == pytest.approx([-0.01, -0.01])
    assert checks["small AUC − fedavg_aug"]["status"] == "met"
    assert checks["small AUC − fedavg_aug"]["per_seed"] == pytest.approx([0.0775, 0.0775])
    assert checks["worst AUC − fedavg_aug worst"]["per_seed"] == pytest.approx([0.19, 0.19])
    panel = checks["out-of-envelope panel AUC − fedavg_aug"]
    assert panel["per_seed"] == pytest.approx([0.19, 0.19]) and panel["status"] == "met"
    assert checks["teacher − student mean AUC"]["per_seed"] == pytest.approx([0.005, 0.025])
    assert checks["teacher − student mean AUC"]["seeds_passing"] == 1
    assert checks["teacher − student mean AUC"]["status"] == "missed"  # mean 0.015 > 0.01
    upload = checks["FedHelp upload / HSL upload per clinic per round"]
    assert upload["per_seed"] == pytest.approx([0.04, 0.04]) and upload["status"] == "met"
    assert tg["paired"]["hsl"]["small_minus_fedavg_aug"]["mean"] == pytest.approx(0.95 - 0.8125)


def test_a_small_clinic_validation_tie_goes_to_all_clinics_validation() -> None:
    """The small clinics' few validation images often give every strategy AUC 1.0: the hospitals decide."""
    recs = []
    for seed in (0, 1):
        recs.append(finalize_record("fedavg_aug", seed, _raw([0.8] * 6, 0.7), 1, {}))
        hsl = _raw([0.9] * 6, 0.8, val=1.0)
        pfednet = _raw([0.7] * 6, 0.6, val=1.0)
        hsl["clinics"]["A"]["val_auc"] = 0.95
        pfednet["clinics"]["A"]["val_auc"] = 0.97
        recs.append(finalize_record("hsl", seed, hsl, 1, {}))
        recs.append(finalize_record("pfednet", seed, pfednet, 1, {}))
    assert targets(recs)["best_strategy"] == "pfednet"  # tied on C–F, higher on A; its test AUC plays no part


def test_strategies_are_compared_at_their_last_round_not_at_a_kept_best_round() -> None:
    """A best round kept on validation reads high on validation by construction: the choice does not look."""
    recs = []
    for seed in (0, 1):
        recs.append(finalize_record("fedavg_aug", seed, _raw([0.8] * 6, 0.7), 1, {}))
        last = {"last_round_val_auc": 0.70, "last_round_all_val_auc": 0.72}
        recs.append(finalize_record("hsl", seed, _raw([0.8] * 6, 0.7, val=0.95, extra=last), 1, {}))
        recs.append(finalize_record("pfednet", seed, _raw([0.8] * 6, 0.7, val=0.85), 1, {}))
    assert targets(recs)["best_strategy"] == "pfednet"
    assert "\\* the kept round's" not in render_markdown(build_results(recs, META))
    # Records made before the last round was recorded are compared on what they have, and marked.
    for r in recs:
        r["extra"] = {"best_round": 3.0} if r["method"] == "hsl" else {}
    assert targets(recs)["best_strategy"] == "hsl"
    md = render_markdown(build_results(recs, META))
    assert "| 0.950* |" in md and "\\* the kept round's" in md


def test_markdown_lists_every_method_and_target() -> None:
    results = build_results(_records(), META)
    md = render_markdown(results)
    for m in ("central_aug", "local_aug", "fedavg_aug", "hsl", "fedhelp"):
        assert f"| {m} |" in md
    assert "small AUC − fedavg_aug" in md
    chosen = "small-clinic validation AUC at the last round, ties broken by all clinics'"
    assert f"best fedclinic strategy by {chosen}: **fedhelp**" in md
    assert "| p1 | p2 | mean |" in md
    assert "Out-of-envelope unseen panel (AUC, `my-panel.toml`)" in render_markdown(
        build_results(_records(), {**META, "panel_file": "/home/me/clinics/my-panel.toml"})
    )
    # Without any fedclinic strategy the heading says so (it printed **None**).
    baselines = [r for r in _records() if r["method"] not in ("hsl", "fedhelp", "pfednet")]
    md = render_markdown(build_results(baselines, META))
    assert "none of HSL, FedHelp and pFedNet ran" in md and "None" not in md


def test_each_mechanism_is_paired_with_its_ablation() -> None:
    recs = _records()
    for seed, small in ((0, 0.90), (1, 0.93)):
        recs.append(finalize_record("hsl_noanchor", seed, _raw([small] * 6, 0.70, val=0.7), 1, {}))
    tg = targets(recs)
    d = tg["ablations"]["hsl − hsl_noanchor"]
    assert d["small"]["mean"] == pytest.approx(0.95 - 0.915) and d["small"]["n"] == 2
    assert d["unseen"]["mean"] == pytest.approx(0.08)
    # Pairs whose ablation did not run are left out, not reported as zero.
    assert "fedhelp − fedhelp_nofm" not in tg["ablations"]
    assert "pfednet − pfednet_nograph" not in tg["ablations"]
    for seed, (fused, alone) in enumerate(((0.90, 0.91), (0.92, 0.95))):
        recs.append(finalize_record("pfednet", seed, _raw([fused] * 6, 0.8), 1, {}))
        recs.append(finalize_record("pfednet_nograph", seed, _raw([alone] * 6, 0.8), 1, {}))
    graph = targets(recs)["ablations"]["pfednet − pfednet_nograph"]
    assert graph["small"]["mean"] == pytest.approx(-0.02) and graph["worst"]["n"] == 2
    md = render_markdown(build_results(recs, META))
    assert "| hsl − hsl_noanchor | 0.035±0.021 |" in md


def test_one_time_work_is_counted_apart_from_the_steps_column() -> None:
    recs = [
        finalize_record("fedhelp", 0, _raw([0.9] * 6, 0.8), 1, {}, steps=288, one_time_steps=768),
        finalize_record("fedhelp", 1, _raw([0.9] * 6, 0.8), 1, {}, steps=288),
    ]
    results = build_results(recs, META)
    assert results["methods"]["fedhelp"]["steps"]["mean"] == 288
    assert results["methods"]["fedhelp"]["one_time_steps"] == 768
    assert "768 steps in fedhelp's runs" in render_markdown(results)


def _envelope(outside: int, *, federated: bool = True, nodes: int = 5) -> dict[str, Any]:
    """A synthetic ``envelope_rates`` result: ``outside`` of 100 at every place, for all three envelopes."""

    def counts(k: int) -> dict[str, Any]:
        c = {"outside": k, "n": 100, "embedding": k, "intensity": 0, "negative": 0}
        return {"clinics": dict.fromkeys("ABCDEF", c), "unseen": c, "panel": {"p1": c, "p2": c}}

    env: dict[str, Any] = {"quantile": 0.99, **counts(outside), "hub": counts(2 * outside)}
    if federated:
        env["thresholds"] = {"embedding": 30.0 + outside, "intensity": 12.0}
        env["federated"] = {
            "nodes": nodes,
            "images": 40 * nodes,
            **counts(outside + 20),
            "thresholds": {"embedding": 33.0 + outside, "intensity": 11.0},
        }
    return env


def test_the_federated_envelope_is_summarised_like_the_hubs() -> None:
    recs = [
        finalize_record(
            "fedavg_aug", seed, {**_raw([0.8] * 6, 0.7), "envelope": _envelope(k, nodes=n)}, 1, {}
        )
        for seed, (k, n) in enumerate(((1, 5), (3, 4)))
    ]
    results = build_results(recs, META)
    summary = results["methods"]["fedavg_aug"]["envelope"]
    fed = summary["federated"]
    assert fed["nodes"]["mean"] == pytest.approx(4.5) and fed["nodes"]["n"] == 2
    assert fed["rate"]["A"]["mean"] == pytest.approx(0.22) and set(fed["rate"]) == set(summary["rate"])
    # 21 and 23 of 100 at 5 × 1 % are drift alarms; the pooled 1 and 3 are not.
    assert fed["alarms"]["panel/p1"] == 2 and summary["alarms"]["panel/p1"] == 0
    assert fed["thresholds"]["embedding"]["mean"] == pytest.approx(35.0)
    assert summary["thresholds"]["embedding"]["mean"] == pytest.approx(32.0)
    assert summary["hub"]["rate"]["unseen"]["mean"] == pytest.approx(0.04)
    md = render_markdown(results)
    assert (
        "Federated input envelope (fitted by the two envelope rounds over the clinics' own validation" in md
    )
    assert "fewer than 10 validation images sends nothing" in md
    assert "| fedavg_aug (4.5 clinics) | 22.0% (2/2) |" in md
    assert "| fedavg_aug | embedding | 32.00±1.41 | 35.00±1.41 |" in md


def test_records_before_the_federated_envelope_still_summarise() -> None:
    """results.json files written before the federated envelope have no ``federated`` nor thresholds."""
    recs = [
        finalize_record(
            "fedavg_aug", s, {**_raw([0.8] * 6, 0.7), "envelope": _envelope(1, federated=f)}, 1, {}
        )
        for s, f in ((0, False), (1, True))
    ]
    results = build_results(recs, META)
    summary = results["methods"]["fedavg_aug"]["envelope"]
    assert "federated" not in summary and "thresholds" not in summary and "hub" in summary
    md = render_markdown(results)
    assert "as `fedclinic-hub export` ships it today" in md and "Federated input envelope" not in md
    # A seed whose sending clinics held too few images to fit it: the clinics are counted, no rates.
    recs[0]["envelope"] = _envelope(1)
    recs[0]["envelope"]["federated"] = {"nodes": 1, "images": 30}
    summary = build_results(recs, META)["methods"]["fedavg_aug"]["envelope"]
    assert summary["federated"] == {"nodes": {"mean": 3.0, "sd": pytest.approx(2**1.5), "n": 2}}
    assert "| fedavg_aug (3 clinics) | not fitted (too few images) |" in render_markdown(
        build_results(recs, META)
    )


def test_the_rounds_over_the_analysed_images_get_their_own_table() -> None:
    def with_traffic(k: int) -> dict[str, Any]:
        env = _envelope(k)
        env["traffic"] = {**env["federated"], "nodes": 6, "images": 720}
        env["traffic"]["thresholds"] = {"embedding": 40.0 + k, "intensity": 13.0}
        return env

    recs = [
        finalize_record("fedavg_aug", seed, {**_raw([0.8] * 6, 0.7), "envelope": with_traffic(k)}, 1, {})
        for seed, k in enumerate((1, 3))
    ]
    results = build_results(recs, META)
    summary = results["methods"]["fedavg_aug"]["envelope"]
    assert summary["traffic"]["nodes"]["mean"] == 6 and summary["traffic"]["alarms"]["panel/p1"] == 2
    md = render_markdown(results)
    assert "The same rounds over the images each clinic analysed" in md
    assert "| fedavg_aug (6 clinics) | 22.0% (2/2) |" in md
    assert "| fedavg_aug | embedding | 32.00±1.41 | 42.00±1.41 |" in md


def test_the_choice_under_stress_can_favour_a_strategy_that_holds_up_past_the_augmentation() -> None:
    """Rule two averages the small clinics' validation AUC with every clinic's validation AUC under stress: a
    strategy a little lower in distribution and much higher under stress wins there, and only there."""
    recs = []
    for seed in (0, 1):
        recs.append(finalize_record("fedavg_aug", seed, _raw([0.8] * 6, 0.7), 1, {}))
        recs.append(finalize_record("central_aug", seed, _raw([0.8] * 6, 0.7), 1, {}))
        plain = _raw([0.8] * 6, 0.7, val=0.95)
        plain["stress_val"] = {"gamma-3": 0.70, "blur-2.5": 0.72}
        robust = _raw([0.82] * 6, 0.8, val=0.93)
        robust["stress_val"] = {"gamma-3": 0.85, "blur-2.5": 0.87}
        recs.append(finalize_record("pfednet", seed, plain, 1, {}))
        recs.append(finalize_record("pfednet_rc_cons", seed, robust, 1, {}))
    tg = targets(recs)
    assert tg["best_strategy"] == "pfednet"
    stress = tg["under_stress"]
    assert stress["best_strategy"] == "pfednet_rc_cons"
    checks = {c["name"]: c for c in stress["checks"]}
    assert checks["out-of-envelope panel AUC − fedavg_aug"]["per_seed"] == pytest.approx([0.1, 0.1])
    assert checks["small AUC − fedavg_aug"]["per_seed"] == pytest.approx([0.02, 0.02])
    results = build_results(recs, META)
    assert results["methods"]["pfednet_rc_cons"]["stress_val_auc"]["mean"] == pytest.approx(0.86)
    md = render_markdown(results)
    assert "validation AUC under stress (`harness/flbench/stress.py`): **pfednet_rc_cons**" in md
    # Records made before stress was recorded (one strategy without it): no second choice, no second table.
    del recs[-1]["stress_val"]
    assert "under_stress" not in targets(recs)
    assert "**pfednet_rc_cons**" not in render_markdown(build_results(recs, META))


def test_the_choice_on_the_whole_validation_split_reads_each_clinics_scanner_on_every_image() -> None:
    """Rule three compares the small clinics' AUC on the whole validation split: a strategy that reads high
    on its few own images but lower on the whole split loses there, and only there. A kept-round method
    (HSL) is compared at its last round there too."""
    recs = []
    for seed in (0, 1):
        recs.append(finalize_record("fedavg_aug", seed, _raw([0.8] * 6, 0.7), 1, {}))
        recs.append(finalize_record("central_aug", seed, _raw([0.8] * 6, 0.7), 1, {}))
        lucky = _raw([0.8] * 6, 0.7, val=0.95)
        steady = _raw([0.83] * 6, 0.8, val=0.90)
        for raw, whole in ((lucky, 0.78), (steady, 0.84)):
            for c in raw["clinics"].values():
                c["val_auc_whole"] = whole
        last = {"last_round_val_auc": 0.5, "last_round_all_val_auc": 0.5}
        last |= {"last_round_val_auc_whole": 0.70, "last_round_all_val_auc_whole": 0.70}
        kept = _raw([0.9] * 6, 0.7, val=0.99, extra={"best_round": 3.0, **last})
        for c in kept["clinics"].values():
            c["val_auc_whole"] = 0.99  # the kept round's reading: not what the rule compares
        recs += [
            finalize_record("pfednet_bn_rc_cons", seed, lucky, 1, {}),
            finalize_record("pfednet_rc_cons", seed, steady, 1, {}),
            finalize_record("hsl", seed, kept, 1, {}),
        ]
    tg = targets(recs)
    assert tg["best_strategy"] == "pfednet_bn_rc_cons"
    again = tg["whole_val"]
    assert again["best_strategy"] == "pfednet_rc_cons"
    checks = {c["name"]: c for c in again["checks"]}
    assert checks["small AUC − fedavg_aug"]["per_seed"] == pytest.approx([0.03, 0.03])
    results = build_results(recs, META)
    assert results["methods"]["hsl"]["choice_val_auc_whole"] == pytest.approx((0.70, 0.70))
    md = render_markdown(results)
    assert "on the whole validation split through each clinic's scanner, ties broken by all clinics': " in md
    assert "**pfednet_rc_cons**" in md and "| pfednet_rc_cons | 0.730±0.000 | 0.630±0.000 |" in md
    # Records made before the whole split was read (one strategy without it): no third choice.
    recs = [r for r in recs if r["method"] != "hsl"]
    recs += [finalize_record("hsl", seed, _raw([0.9] * 6, 0.7), 1, {}) for seed in (0, 1)]
    assert "whole_val" not in targets(recs)


def _with_whole(raw: dict[str, Any], whole: list[float]) -> dict[str, Any]:
    """``raw`` with every clinic also read on the whole test split (``auc_whole``)."""
    for c, a in zip("ABCDEF", whole, strict=True):
        raw["clinics"][c]["auc_whole"] = a
    return raw


def test_the_whole_split_has_its_own_small_mean_worst_clinic_and_targets() -> None:
    """The worst clinic on the whole split is found on its own figures (here another clinic than on the
    subsets), and the chosen strategy's clinic targets are paired on them; records without them add none."""
    r = finalize_record(
        "x", 0, _with_whole(_raw([0.9, 0.8, 0.7, 0.6, 0.5, 0.95], 0.8), [0.9] * 5 + [0.7]), 1, {}
    )
    assert (r["worst_auc"], r["worst_clinic"]) == (0.5, "E")
    assert (r["worst_auc_whole"], r["worst_clinic_whole"]) == (0.7, "F")
    assert r["small_auc_whole"] == pytest.approx((0.9 * 3 + 0.7) / 4)
    assert "worst_auc_whole" not in finalize_record("x", 0, _raw([0.9] * 6, 0.8), 1, {})

    recs = []
    for seed, lift in ((0, 0.01), (1, 0.05)):
        recs += [
            finalize_record("central_aug", seed, _with_whole(_raw([0.9] * 6, 0.8), [0.9] * 6), 1, {}),
            finalize_record("fedavg_aug", seed, _with_whole(_raw([0.8] * 6, 0.7), [0.8] * 5 + [0.6]), 1, {}),
            finalize_record(
                "pfednet", seed, _with_whole(_raw([0.85] * 6, 0.7), [0.8] * 5 + [0.6 + lift]), 1, {}
            ),
        ]
    tg = targets(recs)
    assert tg["best_strategy"] == "pfednet"
    whole = {c["name"]: c for c in tg["whole_split_checks"]}
    worst = whole["worst AUC − fedavg_aug worst (whole split)"]
    assert worst["per_seed"] == pytest.approx([0.01, 0.05]) and worst["seeds_passing"] == 1
    assert worst["status"] == "met"  # mean 0.03
    small = whole["small AUC − fedavg_aug (whole split)"]
    assert small["per_seed"] == pytest.approx([0.0025, 0.0125]) and small["status"] == "missed"
    assert tg["paired_whole"]["pfednet"]["worst_minus_central_aug"]["mean"] == pytest.approx(0.63 - 0.9)
    md = render_markdown(build_results(recs, META))
    row = (
        "| pfednet | "
        + "0.800±0.000 | " * 5
        + "0.630±0.028 | 0.758±0.007 | 0.630±0.028 | 0.007±0.007 | 0.030±0.028 |"
    )
    assert row in md
    assert "| worst AUC − fedavg_aug worst (whole split) | 0.030±0.028 | ≥ 0.03 | 1/2 | met |" in md

    assert targets(_records())["whole_split_checks"] == []
    assert "whole test split" not in render_markdown(build_results(_records(), META))


def test_the_report_names_the_package_versions_its_records_were_made_under() -> None:
    today = {"python": "3.11.2", "numpy": "2.4.6", "scipy": "1.17.1"}
    before = {**today, "numpy": "2.4.5"}
    records = _records()
    for i, r in enumerate(records):
        r["packages"] = today if i % 3 else before
    one_set = render_markdown(build_results([{**r, "packages": today} for r in records], META))
    assert "Made under python 3.11.2, numpy 2.4.6, scipy 1.17.1 (10 records)." in one_set
    results = build_results([*records, *(_records()[:2])], META)  # two records made before versions were kept
    assert [s["records"] for s in results["packages"]] == [6, 4, 2]
    assert results["packages"][-1]["versions"] is None
    md = render_markdown(results)
    assert "Records made under 3 sets of package versions" in md
    assert "numpy 2.4.5, scipy 1.17.1 (4 records)" in md and "not recorded (2 records" in md


def test_a_report_mixing_records_from_before_an_extra_existed_averages_it_where_recorded() -> None:
    """Records made before an extra was added (hsl's product_round_*) merge with later ones in one report."""
    anchors = {"mean": {"mean_clinic_auc": 0.75}}
    extra_new = {"best_round": 4.0, "product_round": 12.0, "product_round_small_auc": 0.70}
    recs = [
        finalize_record("hsl", 0, _raw([0.8] * 6, 0.7, extra={"best_round": 6.0}), 1, {}),
        finalize_record("hsl", 1, _raw([0.8] * 6, 0.7, extra=extra_new), 1, {}),
        finalize_record(
            "hsl", 2, _raw([0.8] * 6, 0.7, extra={**extra_new, "product_round_small_auc": 0.74}), 1, {}
        ),
    ]
    md = render_markdown(build_results(recs, META))
    line = next(x for x in md.splitlines() if x.startswith("- **hsl**"))
    assert line == (
        "- **hsl**: best_round 4.667±1.155; product_round 12.000±0.000 (2 of 3 records); "
        "product_round_small_auc 0.720±0.028 (2 of 3 records)"
    )
    # A kind of extra that is not a number says so too.
    recs[0] = finalize_record("hsl", 0, _raw([0.8] * 6, 0.7, extra={"anchor_auc": anchors}), 1, {})
    md = render_markdown(build_results(recs, META))
    line = next(x for x in md.splitlines() if x.startswith("- **hsl**"))
    assert "anchor → mean clinic AUC: mean 0.750 (1 of 3 records)" in line, line
