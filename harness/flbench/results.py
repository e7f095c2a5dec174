"""Benchmark records → summaries, seed-paired comparisons, targets, results.json/.md."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

from edge_node.protocol.envelope import DRIFT_ALARM_P, DRIFT_TOLERANCE, drift_alarm, looks_negative
from edge_node.protocol.envelope_moments import MIN_FOLD_IMAGES
from harness.flbench.datasets import SMALL_CLINICS
from harness.flbench.envelope_rates import HOSTILE_STRETCH
from harness.flbench.packages import describe_package_sets, package_sets
from harness.flbench.scoring import finite_mean, selection_key
from hub.rounds.envelope_influence import INFLUENCE_WARNING

#: The envelopes the two rounds fit (``harness.flbench.envelope_rates``), in the order the report shows them.
FITTED = ("federated", "traffic", "traffic_hostile")

Record = dict[str, Any]
#: fedclinic's own strategies: "the best fedclinic strategy" is picked among these, on validation. The
#: bench-only variants (local fine-tuning, tail averaging, test-time augmentation) are not among them;
#: SAM's is, as a round can ask the nodes for it (``client.sam_rho``).
OURS: tuple[str, ...] = (
    "hsl",
    "fedhelp",
    "pfednet",
    "pfednet_bn",
    "pfednet_cons",
    "pfednet_bn_cons",
    "pfednet_rc_cons",
    "pfednet_bn_rc_cons",
    "pfednet_rc_cons_sam",
)
#: The fair references: augmented like the strategies, GroupNorm.
REF_LOCAL, REF_CENTRAL, REF_FEDAVG = "local_aug", "central_aug", "fedavg_aug"
_CLINIC_METRICS: tuple[str, ...] = ("auc", "bacc", "sens")
#: (method, its ablation): the mechanism's worth is the paired difference, reported when both ran.
ABLATIONS: tuple[tuple[str, str], ...] = (
    ("hsl", "hsl_noanchor"),
    ("hsl_concat", "hsl_concat_noanchor"),
    ("hsl", "fedavg_hslsteps"),
    ("fedavg_hslsteps", "fedavg_aug"),
    ("fedhelp", "fedhelp_nofm"),
    ("fedhelp", "fedhelp_norank"),
    ("pfednet", "pfednet_nograph"),
    ("pfednet_bn", "pfednet_bn_nograph"),
    ("pfednet_bn", "fedbn"),
    ("fedbn_adabn", "fedbn"),
    ("fedavg_adabn", "fedavg"),
    ("fedavg_aug_cons", "fedavg_aug"),
    ("central_aug_cons", "central_aug"),
    ("pfednet_cons", "pfednet"),
    ("pfednet_bn_cons", "pfednet_bn"),
    ("fedavg_aug_rc", "fedavg_aug"),
    ("fedavg_aug_rc_cons", "fedavg_aug_cons"),
    ("central_aug_rc_cons", "central_aug_cons"),
    ("pfednet_rc_cons", "pfednet_cons"),
    ("pfednet_bn_rc_cons", "pfednet_bn_cons"),
    ("fedavg_aug_ft", "fedavg_aug"),
    ("pfednet_rc_cons_ft", "pfednet_rc_cons"),
    ("ditto_aug", "fedavg_aug"),
    ("ditto_rc_cons", "fedavg_aug_rc_cons"),
    ("fedavg_aug_tail", "fedavg_aug"),
    ("fedavg_aug_rc_cons_tail", "fedavg_aug_rc_cons"),
    ("pfednet_rc_cons_tail", "pfednet_rc_cons"),
    ("fedavg_aug_tta", "fedavg_aug"),
    ("fedavg_aug_rc_cons_tta", "fedavg_aug_rc_cons"),
    ("pfednet_rc_cons_tta", "pfednet_rc_cons"),
    ("fedavg_aug_sam", "fedavg_aug"),
    ("fedavg_aug_rc_cons_sam", "fedavg_aug_rc_cons"),
    ("pfednet_rc_cons_sam", "pfednet_rc_cons"),
)


def finalize_record(
    method: str,
    seed: int,
    raw: Mapping[str, Any],
    wall_s: float,
    config: Mapping[str, Any],
    steps: int = 0,
    one_time_steps: int = 0,
) -> Record:
    """A method's raw metrics for one seed plus the derived columns (small-clinic mean, worst clinic).

    ``raw["small"]`` names the small clinics (default: those of the six-clinic setting); ``steps`` is the
    number of optimiser steps the method took over every clinic, so that budgets can be compared;
    ``one_time_steps`` those of shared one-time work it happened to do (``harness.flbench.steps``).
    """
    clinics = raw["clinics"]
    names = list(clinics)
    small = [c for c in raw.get("small", SMALL_CLINICS) if c in clinics]
    aucs = {c: float(clinics[c]["auc"]) for c in names}
    worst = min(names, key=lambda c: aucs[c] if math.isfinite(aucs[c]) else -1.0)
    bytes_up = {c: float(b) for c, b in raw.get("bytes_per_client_round", {}).items()}
    # Counts outside the model's input envelope (methods with one deployable model; see envelope_rates).
    envelope = {"envelope": raw["envelope"]} if "envelope" in raw else {}
    stress = (
        {"stress_val": {k: float(v) for k, v in raw["stress_val"].items()}} if "stress_val" in raw else {}
    )
    return {
        **_whole_split(clinics, names, small),
        "method": method,
        "seed": seed,
        "clinics": {c: {k: float(v) for k, v in clinics[c].items()} for c in names},
        "small": small,
        "unseen": {k: float(v) for k, v in raw["unseen"].items()},
        "panel": {n: {k: float(v) for k, v in m.items()} for n, m in raw.get("panel", {}).items()},
        "panel_mean": {k: float(v) for k, v in raw.get("panel_mean", {}).items()},
        "small_auc": float(np.mean([aucs[c] for c in small])),
        "small_bacc": float(np.mean([clinics[c]["bacc"] for c in small])),
        "small_sens": finite_mean([float(clinics[c].get("sens", math.nan)) for c in small]),
        "small_val_auc": finite_mean([float(clinics[c].get("val_auc", math.nan)) for c in small]),
        "val_auc": finite_mean([float(clinics[c].get("val_auc", math.nan)) for c in names]),
        **_whole_validation(clinics, names, small),
        "worst_auc": aucs[worst],
        "worst_clinic": worst,
        "bytes_per_client_round": bytes_up,
        "mean_bytes_per_client_round": float(np.mean(list(bytes_up.values()))) if bytes_up else 0.0,
        "stats_bytes_per_client_round": {
            c: float(b) for c, b in raw.get("stats_bytes_per_client_round", {}).items()
        },
        "steps": int(steps),
        "one_time_steps": int(one_time_steps),
        "wall_s": float(wall_s),
        "extra": raw.get("extra", {}),
        "config": dict(config),
        **envelope,
        **stress,
    }


def _whole_split(clinics: Mapping[str, Mapping[str, Any]], names: list[str], small: list[str]) -> Record:
    """The small-clinic mean and the worst clinic on the whole test split through each clinic's scanner
    (``BenchData.whole_test_x``); nothing for records whose clinics were not scored there."""
    if not names or not all("auc_whole" in clinics[c] for c in names):
        return {}
    aucs = {c: float(clinics[c]["auc_whole"]) for c in names}
    worst = min(names, key=lambda c: aucs[c] if math.isfinite(aucs[c]) else -1.0)
    return {
        "small_auc_whole": float(np.mean([aucs[c] for c in small])),
        "worst_auc_whole": aucs[worst],
        "worst_clinic_whole": worst,
    }


def _whole_validation(clinics: Mapping[str, Mapping[str, Any]], names: list[str], small: list[str]) -> Record:
    """The small clinics' and every clinic's mean AUC on the whole validation split through each clinic's
    scanner (``BenchData.whole_val_x``); nothing for records whose clinics were not read there."""
    if not names or not all("val_auc_whole" in clinics[c] for c in names):
        return {}
    return {
        "small_val_auc_whole": finite_mean([float(clinics[c]["val_auc_whole"]) for c in small]),
        "all_val_auc_whole": finite_mean([float(clinics[c]["val_auc_whole"]) for c in names]),
    }


def _ms(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "n": len(arr),
    }


def summarize_method(records: Sequence[Record]) -> dict[str, Any]:
    """Mean ± sd over seeds of every column of one method."""
    names = list(records[0]["clinics"])
    metrics = [m for m in _CLINIC_METRICS if all(m in r["clinics"][names[0]] for r in records)]
    out: dict[str, Any] = {
        "seeds": [r["seed"] for r in records],
        "clinic_names": names,
        "clinics": {c: {m: _ms([r["clinics"][c][m] for r in records]) for m in metrics} for c in names},
        "unseen": {m: _ms([r["unseen"][m] for r in records]) for m in ("auc", "bacc")},
        "small_auc": _ms([r["small_auc"] for r in records]),
        "small_bacc": _ms([r["small_bacc"] for r in records]),
        "small_sens": _ms([r.get("small_sens", math.nan) for r in records]),
        "small_val_auc": _ms([r.get("small_val_auc", math.nan) for r in records]),
        "val_auc": _ms([_all_clinics_val_auc(r) for r in records]),
        # (small clinics, all clinics) at the last round, mean over seeds: what best_ours compares.
        "choice_val_auc": tuple(
            finite_mean(list(v)) for v in zip(*(_last_round_val(r) for r in records), strict=True)
        ),
        # Each clinic's validation images past the augmentation (harness.flbench.stress), mean over the
        # stresses: what best_ours_under_stress adds to the choice. NaN for records made before it.
        "stress_val_auc": _ms([_stress_val(r) for r in records]),
        # The same on the whole validation split through each clinic's scanner: what best_ours_whole_val
        # compares. NaN for records made before it.
        "choice_val_auc_whole": tuple(
            finite_mean(list(v)) for v in zip(*(_last_round_val_whole(r) for r in records), strict=True)
        ),
        "choice_val_is_kept_round": any(
            "best_round" in r.get("extra", {}) and "last_round_val_auc" not in r["extra"] for r in records
        ),
        "worst_auc": _ms([r["worst_auc"] for r in records]),
        "worst_clinics": [r["worst_clinic"] for r in records],
        "steps": _ms([r.get("steps", 0) for r in records]),
        "one_time_steps": int(sum(r.get("one_time_steps", 0) for r in records)),
        "wall_s": _ms([r["wall_s"] for r in records]),
    }
    classes = sorted(k for k in records[0]["clinics"][names[0]] if k.startswith("auc_c"))
    if classes:
        # K-class tasks: each class's one-vs-rest AUC, averaged over the clinics (those where it is defined).
        out["class_auc"] = {
            k[len("auc_") :]: _ms(
                [finite_mean([r["clinics"][c].get(k, math.nan) for c in names]) for r in records]
            )
            for k in classes
        }
    if all("worst_auc_whole" in r for r in records):
        out["clinics_whole"] = {c: _ms([r["clinics"][c]["auc_whole"] for r in records]) for c in names}
        out["small_auc_whole"] = _ms([r["small_auc_whole"] for r in records])
        out["worst_auc_whole"] = _ms([r["worst_auc_whole"] for r in records])
        out["worst_clinics_whole"] = [r["worst_clinic_whole"] for r in records]
    if all(r.get("panel") for r in records):
        out["panel"] = {n: _ms([r["panel"][n]["auc"] for r in records]) for n in records[0]["panel"]}
        out["panel_auc"] = _ms([r["panel_mean"]["auc"] for r in records])
    if all(r.get("envelope") for r in records):
        out["envelope"] = _envelope_summary([r["envelope"] for r in records])
    if any(r["bytes_per_client_round"] for r in records):
        out["bytes_per_client_round"] = {
            c: _ms([r["bytes_per_client_round"][c] for r in records if c in r["bytes_per_client_round"]])[
                "mean"
            ]
            for c in names
            if any(c in r["bytes_per_client_round"] for r in records)
        }
        out["mean_bytes_per_client_round"] = _ms([r["mean_bytes_per_client_round"] for r in records])["mean"]
    return out


def _envelope_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per place (each trained clinic, ``unseen``, ``panel/<name>``): the share of test images outside the
    envelope over seeds, and in how many seeds the count is more than chance (a node's drift alarm)."""
    quantile = float(runs[0]["quantile"])

    def places(run: Mapping[str, Any]) -> dict[str, Mapping[str, int]]:
        out = {**run["clinics"], "unseen": run["unseen"]}
        out.update({f"panel/{n}": c for n, c in run.get("panel", {}).items()})
        return out

    names = list(places(runs[0]))
    counts = [places(r) for r in runs]
    out: dict[str, Any] = {
        "expected": 1.0 - quantile,
        "rate": {n: _ms([c[n]["outside"] / max(c[n]["n"], 1) for c in counts]) for n in names},
        "alarms": {n: sum(drift_alarm(c[n]["outside"], c[n]["n"], quantile) for c in counts) for n in names},
    }

    def alarms(envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        other = [places(e) for e in envelopes]
        return {
            "rate": {n: _ms([c[n]["outside"] / max(c[n]["n"], 1) for c in other]) for n in names},
            "alarms": {
                n: sum(drift_alarm(c[n]["outside"], c[n]["n"], quantile) for c in other) for n in names
            },
        }

    def thresholds(envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {p: _ms([e["thresholds"][p] for e in envelopes]) for p in envelopes[0]["thresholds"]}

    if all("thresholds" in r for r in runs):
        out["thresholds"] = thresholds(runs)
    if all("hub" in r for r in runs):
        # The envelope fitted on the hub's own validation split, as the product ships it today.
        out["hub"] = alarms([r["hub"] for r in runs])
    # The envelopes the two rounds fit: over the clinics' own validation images (those with ≥ 10 send), and
    # over the images each clinic analysed (``traffic``).
    for fitted in FITTED:
        if all(fitted in r for r in runs):
            fed = [r[fitted] for r in runs]
            out[fitted] = {"nodes": _ms([f["nodes"] for f in fed])}
            if all("warned" in f for f in fed):  # runs since `envelope build` reads each node's part
                out[fitted]["warned_seeds"] = sum(bool(f["warned"]) for f in fed)
                out[fitted]["hostile_named"] = sum(f.get("hostile") in f["warned"] for f in fed)
            if all("clinics" in f for f in fed):  # every seed's nodes held enough images to fit it
                out[fitted].update(alarms(fed), thresholds=thresholds(fed))
    if all("intensity" in c[n] for c in counts for n in names):
        # Runs since the intensity part: each part alone, and the node's "looks negative" diagnosis.
        out["expected"] = 2.0 * (1.0 - quantile)
        out["parts"] = {
            n: {
                "intensity_rate": _ms([c[n]["intensity"] / max(c[n]["n"], 1) for c in counts]),
                "embedding_alarms": sum(drift_alarm(c[n]["embedding"], c[n]["n"], quantile) for c in counts),
                "intensity_alarms": sum(drift_alarm(c[n]["intensity"], c[n]["n"], quantile) for c in counts),
                "negative": sum(
                    looks_negative(c[n]["intensity"], c[n]["negative"], c[n]["n"], quantile) for c in counts
                ),
            }
            for n in names
        }
    return out


def _paired(by: Mapping[str, Mapping[int, Record]], a: str, b: str, fn: Any) -> list[float]:
    seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})))
    return [float(fn(by[a][s], by[b][s])) for s in seeds]


def _target(
    name: str, values: list[float], threshold: float, *, higher: bool = True, note: str = ""
) -> dict[str, Any]:
    if not values:
        return {"name": name, "status": "not run", "threshold": threshold, "note": note, "higher": higher}
    stats = _ms(values)
    ok = [v >= threshold if higher else v <= threshold for v in values]
    met = (stats["mean"] >= threshold) if higher else (stats["mean"] <= threshold)
    return {
        "name": name,
        "value": stats,
        "threshold": threshold,
        "higher": higher,
        "per_seed": values,
        "seeds_passing": int(sum(ok)),
        "status": "met" if met else "missed",
        "note": note,
    }


def _all_clinics_val_auc(r: Record) -> float:
    """Mean validation AUC over every clinic of a record (older records lack the stored field)."""
    if "val_auc" in r:
        return float(r["val_auc"])
    return finite_mean([float(c.get("val_auc", math.nan)) for c in r["clinics"].values()])


def _last_round_val(r: Record) -> tuple[float, float]:
    """A record's validation AUCs at its last round (small clinics, all clinics): what methods are compared
    on. A method that keeps a best round records them apart; the kept round's are a maximum over rounds.
    Records made before they were recorded give the kept round's."""
    extra = r.get("extra", {})
    if "last_round_val_auc" in extra:
        return float(extra["last_round_val_auc"]), float(extra["last_round_all_val_auc"])
    return float(r.get("small_val_auc", math.nan)), _all_clinics_val_auc(r)


def _last_round_val_whole(r: Record) -> tuple[float, float]:
    """A record's AUCs on the whole validation split at its last round (small clinics, all clinics); NaN for
    records made before they were read."""
    extra = r.get("extra", {})
    if "last_round_val_auc_whole" in extra:
        return float(extra["last_round_val_auc_whole"]), float(extra["last_round_all_val_auc_whole"])
    return float(r.get("small_val_auc_whole", math.nan)), float(r.get("all_val_auc_whole", math.nan))


def _stress_val(r: Record) -> float:
    return finite_mean(list(r["stress_val"].values())) if r.get("stress_val") else math.nan


#: How the best strategy is chosen. Every strategy is compared at its last round: a round kept because its
#: validation AUC was the highest carries that maximum's optimism (on breast, seeds 0–9, the methods that
#: keep one read 0.03–0.09 higher on validation than on test; FedBN, pFedNet and FedHelp 0.01–0.03 lower).
#: The small clinics' validation splits hold 6–10 images, so their AUC is often 1.0 for every strategy; a
#: tie there (to 1e-9) goes to the higher validation AUC over all clinics.
CHOSEN_ON = "small-clinic validation AUC at the last round, ties broken by all clinics'"


def best_ours(summary: Mapping[str, Mapping[str, Any]]) -> str | None:
    """fedclinic's strategy with the highest mean small-clinic *validation* AUC at its last round, a tie going
    to the highest validation AUC over all clinics (the test split plays no part in the choice); chosen once
    and used for every target."""
    return _best_of_ours(summary, lambda m: selection_key(*summary[m]["choice_val_auc"]), lambda s: 0.0)


#: The second rule (session 21): the small clinics' validation AUC at the last round and every clinic's
#: validation AUC under stress, averaged, so that a strategy that holds up past the augmentation can win.
CHOSEN_ON_STRESS = (
    "mean of small-clinic validation AUC at the last round and every clinic's validation AUC under stress"
)


def best_ours_under_stress(summary: Mapping[str, Mapping[str, Any]]) -> str | None:
    """fedclinic's strategy with the highest mean of its last-round small-clinic validation AUC and its
    validation AUC under stress (``harness.flbench.stress``); None unless every strategy that ran has both.
    The test split and the panel play no part."""

    def key(m: str) -> tuple[float, float]:
        small, every = summary[m]["choice_val_auc"]
        return selection_key((small + summary[m]["stress_val_auc"]["mean"]) / 2, every)

    return _best_of_ours(summary, key, lambda s: s["stress_val_auc"]["mean"])


#: The third rule (session 28): the first rule's quantities read on the whole validation split through each
#: clinic's scanner. A small breast clinic's own 6–10 validation images give AUCs with a seed-to-seed sd of
#: 0.06–0.17, larger than the differences between strategies; the whole split's is 0.10–0.45 of that.
CHOSEN_ON_WHOLE_VAL = (
    "small-clinic validation AUC at the last round on the whole validation split through each clinic's "
    "scanner, ties broken by all clinics'"
)


def best_ours_whole_val(summary: Mapping[str, Mapping[str, Any]]) -> str | None:
    """fedclinic's strategy with the highest mean small-clinic AUC at its last round on the whole validation
    split through each clinic's scanner, a tie going to all clinics'; None unless every strategy that ran
    was read there. The test split and the panel play no part."""
    return _best_of_ours(
        summary,
        lambda m: selection_key(*summary[m]["choice_val_auc_whole"]),
        lambda s: s["choice_val_auc_whole"][0],
    )


def _best_of_ours(
    summary: Mapping[str, Mapping[str, Any]],
    key: Callable[[str], tuple[float, float]],
    needs: Callable[[Mapping[str, Any]], float],
) -> str | None:
    """The strategy of ``OURS`` that ran with the highest ``key``; None unless every one that ran has a finite
    ``needs`` (what the rule reads, absent from records made before it)."""
    present = [m for m in OURS if m in summary]
    if not present or not all(math.isfinite(needs(summary[m])) for m in present):
        return None
    return max(present, key=key)


def _strategy_checks(by: Mapping[str, Mapping[int, Record]], best: str) -> list[dict[str, Any]]:
    """The four strategy targets for ``best`` against the fair references, paired by seed."""
    panel = [v for v in _paired(by, best, REF_FEDAVG, _panel) if math.isfinite(v)]
    return [
        _target("small AUC − central_aug", _paired(by, best, REF_CENTRAL, _small), -0.01),
        _target("small AUC − fedavg_aug", _paired(by, best, REF_FEDAVG, _small), 0.02),
        _target("worst AUC − fedavg_aug worst", _paired(by, best, REF_FEDAVG, _worst), 0.03),
        _target("out-of-envelope panel AUC − fedavg_aug", panel, 0.03),
    ]


def _whole_only(by: Mapping[str, Mapping[int, Record]]) -> dict[str, dict[int, Record]]:
    """Each method's records that were read on the whole test split too (older records were not)."""
    return {m: {s: r for s, r in rs.items() if "worst_auc_whole" in r} for m, rs in by.items()}


def _whole_checks(by: Mapping[str, Mapping[int, Record]], best: str) -> list[dict[str, Any]]:
    """The clinic targets for ``best`` again, every clinic read on the whole test split; empty where the
    records lack it (the seeds where both did are paired)."""
    whole = _whole_only(by)
    if not whole.get(best):
        return []
    return [
        _target(f"{name} (whole split)", _paired(whole, best, ref, fn), threshold)
        for name, ref, fn, threshold in (
            ("small AUC − central_aug", REF_CENTRAL, _small_w, -0.01),
            ("small AUC − fedavg_aug", REF_FEDAVG, _small_w, 0.02),
            ("worst AUC − fedavg_aug worst", REF_FEDAVG, _worst_w, 0.03),
        )
    ]


def _small_w(a: Record, b: Record) -> float:
    return float(a["small_auc_whole"] - b["small_auc_whole"])


def _worst_w(a: Record, b: Record) -> float:
    return float(a["worst_auc_whole"] - b["worst_auc_whole"])


def _small(a: Record, b: Record) -> float:
    return float(a["small_auc"] - b["small_auc"])


def _worst(a: Record, b: Record) -> float:
    return float(a["worst_auc"] - b["worst_auc"])


def _unseen(a: Record, b: Record) -> float:
    return float(a["unseen"]["auc"] - b["unseen"]["auc"])


def _panel(a: Record, b: Record) -> float:
    if not a.get("panel_mean") or not b.get("panel_mean"):
        return math.nan
    return float(a["panel_mean"]["auc"] - b["panel_mean"]["auc"])


def targets(records: Sequence[Record]) -> dict[str, Any]:
    """The targets against the fair references, each computed per seed (paired) and then averaged."""
    by: dict[str, dict[int, Record]] = {}
    for r in records:
        by.setdefault(r["method"], {})[r["seed"]] = r
    summary = {m: summarize_method(list(rs.values())) for m, rs in by.items()}
    best = best_ours(summary)
    out: dict[str, Any] = {"best_strategy": best, "chosen_on": CHOSEN_ON, "checks": []}
    checks: list[dict[str, Any]] = out["checks"]
    if best is not None:
        checks += _strategy_checks(by, best)
        out["whole_split_checks"] = _whole_checks(by, best)
    # The other rules, each where every strategy that ran has what it reads.
    for key, choose, chosen_on in (
        ("under_stress", best_ours_under_stress, CHOSEN_ON_STRESS),
        ("whole_val", best_ours_whole_val, CHOSEN_ON_WHOLE_VAL),
    ):
        chosen = choose(summary)
        if chosen is not None:
            out[key] = {
                "best_strategy": chosen,
                "chosen_on": chosen_on,
                "checks": _strategy_checks(by, chosen),
                "whole_split_checks": _whole_checks(by, chosen),
            }
    gaps = [
        r["extra"]["distill"]["gap"]
        for r in by.get("fedhelp", {}).values()
        if "distill" in r.get("extra", {})
    ]
    checks.append(
        _target("teacher − student mean AUC", gaps, 0.01, higher=False, note="student ≤ 1 M params")
    )
    ratio = _paired(
        by, "fedhelp", "hsl", lambda a, b: a["mean_bytes_per_client_round"] / b["mean_bytes_per_client_round"]
    )
    checks.append(
        _target(
            "FedHelp upload / HSL upload per clinic per round",
            ratio,
            1 / 20,
            higher=False,
            note="both measured from the codec's npz payloads; HSL here uses compact encoders, not ResNet-18",
        )
    )

    # Each mechanism against its ablation, paired by seed.
    def differences(m: str, ablated: str) -> dict[str, dict[str, float] | None]:
        kinds = (("small", _small), ("worst", _worst), ("unseen", _unseen), ("panel", _panel))
        found = {k: [v for v in _paired(by, m, ablated, fn) if math.isfinite(v)] for k, fn in kinds}
        return {k: _ms(v) if v else None for k, v in found.items()}

    out["ablations"] = {
        f"{m} − {ablated}": differences(m, ablated) for m, ablated in ABLATIONS if m in by and ablated in by
    }
    # Every method's small and worst clinics on the whole test split against the references.
    whole = _whole_only(by)
    out["paired_whole"] = {
        m: {
            f"{kind}_minus_{ref}": _ms(vals) if (vals := _paired(whole, m, ref, fn)) else None
            for ref in (REF_CENTRAL, REF_FEDAVG)
            for kind, fn in (("small", _small_w), ("worst", _worst_w))
        }
        for m in by
        if whole[m]
    }
    # Every method against every reference, for the reading (not targets).
    out["paired"] = {
        m: {
            f"{kind}_minus_{ref}": _ms(vals)
            if (vals := [v for v in _paired(by, m, ref, fn) if math.isfinite(v)])
            else None
            for ref in (REF_LOCAL, REF_CENTRAL, REF_FEDAVG)
            for kind, fn in (("small", _small), ("worst", _worst), ("panel", _panel))
        }
        for m in by
    }
    return out


def build_results(records: Sequence[Record], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The results.json document: settings, per-method summaries, per-seed records, targets."""
    by: dict[str, list[Record]] = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    return {
        "meta": dict(meta),
        "methods": {m: summarize_method(rs) for m, rs in by.items()},
        "records": list(records),
        "targets": targets(records),
        "packages": package_sets(records),
    }


def _f(stat: Mapping[str, float] | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    if stat.get("n", 1) > 1:
        return f"{stat['mean']:.{digits}f}±{stat['sd']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def _paragraph(text: str) -> list[str]:
    """A paragraph and the blank line after it; nothing for no text."""
    return [text, ""] if text else []


def _head(*cols: str) -> list[str]:
    """A markdown table's header row and its rule."""
    return ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]


def _kb(b: float | None) -> str:
    return "–" if not b else f"{b / 1024:.0f} KB"


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the main table, sensitivity, the panel, paired comparisons, targets, method extras."""
    meta, methods = results["meta"], results["methods"]
    names: list[str] = next(iter(methods.values()))["clinic_names"] if methods else []
    lines = [
        f"# bench fl — task `{meta['task']}`, skew `{meta['skew']}`, track `{meta.get('track', 'aug')}`",
        "",
        f"Setting `{meta.get('setting', 'six-clinics')}`, seeds {meta['seeds']}, {meta['rounds']} rounds × "
        f"{meta['local_epochs']} local epoch(s); quick={meta['quick']}. AUC mean±sd over the n seeds a "
        "method finished; each clinic tests on the test split resampled at its own prevalence, rendered with "
        "its own profile; thresholds come from each clinic's validation split; unseen = a profile no clinic "
        "trained on; panel = mean over the out-of-envelope unseen panel.",
        "",
        *_paragraph(describe_package_sets(results.get("packages", []))),
        *_head(
            "method",
            "n",
            *names,
            "small",
            "worst",
            "unseen",
            "panel",
            "upload/clinic/round",
            "steps",
            "wall s",
        ),
    ]
    for m, s in methods.items():
        cells = [_f(s["clinics"][c]["auc"]) for c in names]
        lines.append(
            f"| {m} | {len(s['seeds'])} | "
            + " | ".join(cells)
            + f" | {_f(s['small_auc'])} | {_f(s['worst_auc'])} | "
            f"{_f(s['unseen']['auc'])} | {_f(s.get('panel_auc'))} | "
            f"{_kb(s.get('mean_bytes_per_client_round'))} | {s['steps']['mean']:.0f} | "
            f"{s['wall_s']['mean']:.0f} |"
        )
    one_time = {m: s["one_time_steps"] for m, s in methods.items() if s.get("one_time_steps")}
    if one_time:
        lines += [
            "",
            "Not in the steps column: shared one-time work (FedHelp's foundation teacher, trained once per "
            "out dir and reused by every run in it): "
            + ", ".join(f"{n} steps in {m}'s runs" for m, n in one_time.items())
            + ".",
        ]
    lines += [
        "",
        "Balanced accuracy and sensitivity at the validation-chosen threshold (small clinics; for K classes "
        "at the argmax, sensitivity = a grade above 0 called above 0), small-clinic validation AUC of the "
        "reported round (the best round where a method keeps one, a maximum over rounds) and of the last "
        "round (what the choice between strategies compares) and, at the last round, on the whole "
        "validation split through each clinic's scanner, and every clinic's validation AUC under "
        "stress (`harness/flbench/stress.py`, the reported round):",
        "",
        "| method | small bacc | small sensitivity | small val AUC | small val AUC, last round | "
        "small val AUC, last round, whole split | val AUC under stress | unseen bacc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, s in methods.items():
        stress = _f(s["stress_val_auc"]) if math.isfinite(s["stress_val_auc"]["mean"]) else "–"
        whole = s["choice_val_auc_whole"][0]
        lines.append(
            f"| {m} | {_f(s['small_bacc'])} | {_f(s['small_sens'])} | {_f(s['small_val_auc'])} | "
            f"{s['choice_val_auc'][0]:.3f}{'*' if s['choice_val_is_kept_round'] else ''} | "
            f"{f'{whole:.3f}' if math.isfinite(whole) else '–'} | {stress} | {_f(s['unseen']['bacc'])} |"
        )
    if any(s["choice_val_is_kept_round"] for s in methods.values()):
        lines += ["", "\\* the kept round's: runs made before the last round's was recorded."]
    class_names = next((list(s["class_auc"]) for s in methods.values() if "class_auc" in s), [])
    if class_names:
        lines += [
            "",
            "Per-class one-vs-rest AUC (mean over clinics; a clinic's macro AUC is the mean over its "
            "classes):",
            "",
        ]
        lines += _head("method", *class_names)
        for m, s in methods.items():
            if "class_auc" in s:
                lines.append(f"| {m} | " + " | ".join(_f(s["class_auc"][k]) for k in class_names) + " |")
    panel_names = next((list(s["panel"]) for s in methods.values() if "panel" in s), [])
    if panel_names:
        source = f", `{PurePath(meta['panel_file']).name}`" if meta.get("panel_file") else ""
        lines += ["", f"Out-of-envelope unseen panel (AUC{source}):", ""]
        lines += _head("method", *panel_names, "mean")
        for m, s in methods.items():
            if "panel" in s:
                cells = [_f(s["panel"][n]) for n in panel_names]
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {_f(s['panel_auc'])} |")
    lines += _envelope_lines(methods)
    tg = results["targets"]
    lines += _whole_split_lines(methods, tg.get("paired_whole", {}), names)
    cols = [k for k in next(iter(tg["paired"].values()), {})]
    lines += ["", "Paired by seed against the fair references (mean±sd over seeds):", ""]
    lines += _head("method", *(c.replace("_", " ") for c in cols))
    for m, p in tg["paired"].items():
        lines.append(f"| {m} | " + " | ".join(_f(p[c]) for c in cols) + " |")
    if tg.get("ablations"):
        lines += ["", "Each mechanism against its ablation, paired by seed (AUC differences, mean±sd):", ""]
        lines += ["| method − ablation | small | worst | unseen | panel |", "|---|---|---|---|---|"]
        for pair, d in tg["ablations"].items():
            lines.append(
                f"| {pair} | {_f(d['small'])} | {_f(d['worst'])} | {_f(d['unseen'])} | {_f(d['panel'])} |"
            )
    best = tg["best_strategy"]
    chosen = f"**{best}**" if best else "none of HSL, FedHelp and pFedNet ran, so its lines are left out"
    rule = tg.get("chosen_on", "small-clinic validation AUC")
    lines += ["", f"Targets (best fedclinic strategy by {rule}: {chosen}):", ""]
    lines += _target_table(tg["checks"])
    if tg.get("whole_split_checks"):
        lines += ["", "Its clinic targets with every clinic read on the whole test split:", ""]
        lines += _target_table(tg["whole_split_checks"])
    for key, where in (("under_stress", " (`harness/flbench/stress.py`)"), ("whole_val", "")):
        if key in tg:
            again = tg[key]
            lines += [
                "",
                f"The strategy targets again, for the strategy chosen by the {again['chosen_on']}{where}: "
                f"**{again['best_strategy']}**",
                "",
                *_target_table(again["checks"]),
                *_target_table(again.get("whole_split_checks", []))[2:],
            ]
    lines += ["", "Method extras (seed-averaged where numeric):", ""]
    for m in methods:
        extras = [r["extra"] for r in results["records"] if r["method"] == m and r.get("extra")]
        if extras:
            lines.append(f"- **{m}**: " + _extras_line(extras))
    return "\n".join(lines) + "\n"


def _whole_split_lines(
    methods: Mapping[str, Any], paired: Mapping[str, Mapping[str, Any]], names: list[str]
) -> list[str]:
    """Each clinic's AUC on the whole test split through its scanner, and the small and worst columns."""
    with_whole = {m: s for m, s in methods.items() if "clinics_whole" in s}
    if not with_whole:
        return []
    lines = [
        "",
        "Every clinic read on the whole test split through its own scanner (the same models and thresholds; "
        "above, each clinic's test set is the subset at its own prevalence). AUC, and paired by seed:",
        "",
        *_head(
            "method",
            *names,
            "small",
            "worst",
            "small − fedavg_aug",
            "worst − fedavg_aug",
            "worst − central_aug",
        ),
    ]
    for m, s in with_whole.items():
        d = paired.get(m, {})
        lines.append(
            f"| {m} | "
            + " | ".join(_f(s["clinics_whole"][c]) for c in names)
            + f" | {_f(s['small_auc_whole'])} | {_f(s['worst_auc_whole'])} | "
            f"{_f(d.get('small_minus_fedavg_aug'))} | {_f(d.get('worst_minus_fedavg_aug'))} | "
            f"{_f(d.get('worst_minus_central_aug'))} |"
        )
    return lines


def _target_table(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| target | value | threshold | seeds passing | status |", "|---|---|---|---|---|"]
    for t in checks:
        value = _f(t.get("value")) if t.get("value") else "–"
        passing = f"{t['seeds_passing']}/{t['value']['n']}" if t.get("value") else "–"
        op = "≥" if t.get("higher", True) else "≤"
        lines.append(f"| {t['name']} | {value} | {op} {t['threshold']:.3g} | {passing} | {t['status']} |")
    return lines


def _envelope_lines(methods: Mapping[str, Any]) -> list[str]:
    with_envelope = {m: s["envelope"] for m, s in methods.items() if "envelope" in s}
    if not with_envelope:
        return []
    first = next(iter(with_envelope.values()))
    names = list(first["rate"])

    def table(intro: str, cells: Mapping[str, list[str]]) -> list[str]:
        """One row per method, one column per place."""
        head = ["", intro, "", "| method | " + " | ".join(n.removeprefix("panel/") for n in names) + " |"]
        return [
            *head,
            "|---" * (len(names) + 1) + "|",
            *(f"| {m} | " + " | ".join(c) + " |" for m, c in cells.items()),
        ]

    def rates(env: Mapping[str, Any]) -> list[str]:
        n_seeds = env["rate"][names[0]]["n"]
        return [f"{env['rate'][n]['mean']:.1%} ({env['alarms'][n]}/{n_seeds})" for n in names]

    def parts(env: Mapping[str, Any]) -> list[str]:
        n_seeds, p = env["rate"][names[0]]["n"], env["parts"]
        return [
            f"{p[n]['intensity_rate']['mean']:.1%}; {p[n]['embedding_alarms']}/{p[n]['intensity_alarms']}; "
            f"neg {p[n]['negative']}/{n_seeds}"
            for n in names
        ]

    lines = table(
        "Input envelope (fitted on the pooled validation split of the clinics that trained, as a federated "
        "envelope would be; its grey-value part without augmented copies): "
        f"share of each place's test images outside (expected by chance {first['expected']:.0%}), and in "
        f"how many seeds a node's drift alarm fires (one-sided binomial p < {DRIFT_ALARM_P} against "
        f"{DRIFT_TOLERANCE:g} × the chance rate):",
        {m: rates(env) for m, env in with_envelope.items()},
    )
    with_hub = {m: rates(env["hub"]) for m, env in with_envelope.items() if "hub" in env}
    if with_hub:
        lines += table(
            "The same, for the envelope fitted on the hub's own validation split (raw images, no clinic's "
            "profile), as `fedclinic-hub export` ships it today (grey-value part widened by augmented "
            "copies):",
            with_hub,
        )
    with_parts = {m: parts(env) for m, env in with_envelope.items() if "parts" in env}
    if with_parts:
        lines += table(
            "Its two parts (a node counts an image outside either): the share outside the grey-value part, "
            "then in how many seeds the alarm fires on the embedding part alone / on the grey-value part "
            "alone, and in how many the node says the images look like negatives:",
            with_parts,
        )
    titles = {
        "federated": "Federated input envelope (fitted by the two envelope rounds over the clinics' own "
        f"validation images: each trained clinic a node, one with fewer than {MIN_FOLD_IMAGES} validation "
        "images sends nothing; grey-value part without augmented copies)",
        "traffic": "The same rounds over the images each clinic analysed (up to 120 validation images "
        "rendered with its own profile, as a node answers from the features it kept: every clinic takes "
        "part)",
        "traffic_hostile": "The same rounds with one hostile node (the clinic that analysed the most images "
        f"answers as if its features lay {HOSTILE_STRETCH:g} times farther from their mean)",
    }
    for fitted, title in titles.items():
        with_fitted = {m: env[fitted] for m, env in with_envelope.items() if fitted in env}
        if not with_fitted:
            continue
        lines += table(
            f"{title}: share of each place's test images outside and in how many seeds the drift alarm "
            "fires, as in the first table; in brackets after the method, the mean number of clinics that "
            "took part:",
            {
                f"{m} ({fed['nodes']['mean']:.3g} clinics)": rates(fed)
                if "rate" in fed
                else ["not fitted (too few images)"] * len(names)
                for m, fed in with_fitted.items()
            },
        )
        lines += _threshold_lines(with_envelope, fitted)
        lines += _warned_lines(with_fitted, fitted)
    return lines


def _warned_lines(with_fitted: Mapping[str, Mapping[str, Any]], fitted: str) -> list[str]:
    """In how many seeds `envelope build` would name a node (and, with a hostile one, name it)."""
    rows = [
        f"| {m} | {fed['warned_seeds']} | {fed['hostile_named'] if fitted == 'traffic_hostile' else '–'} |"
        for m, fed in with_fitted.items()
        if "warned_seeds" in fed
    ]
    if not rows:
        return []
    return [
        "",
        "Seeds in which `envelope build` would name a node (its answers alone move a threshold or the "
        f"fit's spread {INFLUENCE_WARNING:g}× or more), and in which it names the hostile one:",
        "",
        "| method | seeds naming a node | naming the hostile node |",
        "|---|---|---|",
        *rows,
    ]


def _threshold_lines(with_envelope: Mapping[str, Mapping[str, Any]], fitted: str) -> list[str]:
    """The pooled envelope's and a federated fit's thresholds side by side (squared distances)."""
    rows = []
    for m, env in with_envelope.items():
        pooled, federated = env.get("thresholds", {}), env.get(fitted, {}).get("thresholds", {})
        rows += [
            f"| {m} | {p} | {_f(pooled[p], 2)} | {_f(federated[p], 2)} |" for p in pooled if p in federated
        ]
    if not rows:
        return []
    return [
        "",
        "Their thresholds against the pooled envelope's (squared distances; the pooled one over every "
        "clinic's validation images, the rounds' over the images of the clinics that sent, with the folds "
        "dealt per clinic and the threshold read from the summed histograms):",
        "",
        "| method | part | pooled | federated |",
        "|---|---|---|---|",
        *rows,
    ]


def _extras_line(all_extras: Sequence[Mapping[str, Any]]) -> str:
    """One method's extras, each read over the records that have it: a report can mix records made before
    an extra existed with later ones (a key the first record lacks still shows; a partial one says on how
    many records it rests)."""
    parts = []
    keys = dict.fromkeys(key for e in all_extras for key in e)
    for key in keys:
        extras = [e for e in all_extras if key in e]
        part = _extra_part(key, extras)
        if part is None:
            continue
        partial = f" ({len(extras)} of {len(all_extras)} records)" if len(extras) < len(all_extras) else ""
        parts.append(part + partial)
    return "; ".join(parts)


def _extra_part(key: str, extras: Sequence[Mapping[str, Any]]) -> str | None:
    """One extra over the records that have it; None for a kind the report does not show."""
    value = extras[0][key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{key} {_f(_ms([float(e[key]) for e in extras]))}"
    if isinstance(value, Mapping) and key == "distill":
        gaps = _ms([float(e[key]["gap"]) for e in extras])
        t = _ms([float(e[key]["teacher_mean_clinic_auc"]) for e in extras])
        s = _ms([float(e[key]["student_mean_clinic_auc"]) for e in extras])
        return (
            f"distill {value['teacher']} ({value['teacher_params']} params) → student "
            f"({value['student_params']}"
            f" params): teacher {_f(t)}, student {_f(s)}, gap {_f(gaps)}"
        )
    if isinstance(value, Mapping) and key == "foundation" and value:
        q = {k: _ms([float(e[key][k]) for e in extras if k in e[key]]) for k in ("accuracy", "auc", "ece")}
        return (
            f"foundation soft labels on the held-out public set: accuracy {_f(q['accuracy'])}, "
            f"AUC {_f(q['auc'])}, ECE {_f(q['ece'])}"
        )
    if isinstance(value, Mapping) and key == "anchor_auc":
        per = {a: _ms([float(e[key][a]["mean_clinic_auc"]) for e in extras]) for a in value}
        return "anchor → mean clinic AUC: " + ", ".join(f"{a} {_f(v)}" for a, v in per.items())
    if isinstance(value, (str, list)):
        return f"{key} {value}"
    return None
