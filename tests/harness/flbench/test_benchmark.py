"""Benchmark bookkeeping: which cached runs are reusable, method parsing, progress units."""

from __future__ import annotations

import pytest

from harness.flbench.benchmark import parse_methods, same_settings, total_rounds
from harness.flbench.methods import METHODS, BenchConfig


def test_cached_runs_are_reused_only_with_the_same_settings() -> None:
    cfg = {"task": "breast", "rounds": 12, "distill_min_steps": 1000}
    assert same_settings("fedavg", dict(cfg), cfg)
    assert not same_settings("fedavg", {**cfg, "rounds": 2}, cfg)
    assert not same_settings("fedavg", None, cfg)
    # Distillation settings only change fedhelp's result.
    assert same_settings("hsl", {"task": "breast", "rounds": 12}, cfg)
    assert not same_settings("fedhelp", {"task": "breast", "rounds": 12}, cfg)
    # A family's own settings only change that family's runs (ablations included).
    hsl = {**cfg, "hsl_anchor_weight": 0.5}
    assert same_settings("fedavg_aug", {**hsl, "hsl_anchor_weight": 2.0}, hsl)
    assert not same_settings("hsl_noanchor", {**hsl, "hsl_anchor_weight": 2.0}, hsl)
    assert same_settings("fedavg", {**cfg, "fedprox_mu": 0.1}, {**cfg, "fedprox_mu": 0.01})
    # The local fine-tuning's rate changes the *_ft runs only; records from before it existed still count.
    ft = {**cfg, "finetune_lr": 3e-4}
    assert same_settings("pfednet_rc_cons", dict(cfg), ft)
    assert not same_settings("pfednet_rc_cons_ft", {**ft, "finetune_lr": 1e-3}, ft)
    assert not same_settings("fedavg_aug_ft", dict(cfg), ft)
    # Ditto's λ changes the ditto_* runs only.
    ditto = {**cfg, "ditto_lam": 0.1}
    assert same_settings("fedavg_aug", {**ditto, "ditto_lam": 1.0}, ditto)
    assert not same_settings("ditto_rc_cons", {**ditto, "ditto_lam": 1.0}, ditto)
    assert not same_settings("ditto_aug", {**ditto, "ditto_lr": 0.1}, {**ditto, "ditto_lr": 0.01})
    # The tail's length changes the *_tail runs only; records from before it existed still count.
    tail = {**cfg, "tail_rounds": 4}
    assert same_settings("pfednet_rc_cons", dict(cfg), tail)
    assert not same_settings("pfednet_rc_cons_tail", {**tail, "tail_rounds": 6}, tail)
    assert not same_settings("fedavg_aug_tail", dict(cfg), tail)
    # SAM's radius changes the *_sam runs only; records from before it existed still count.
    sam = {**cfg, "sam_rho": 0.05}
    assert same_settings("pfednet_rc_cons", dict(cfg), sam)
    assert same_settings("fedavg_aug_tail", {**sam, "sam_rho": 0.1}, sam)
    assert not same_settings("pfednet_rc_cons_sam", {**sam, "sam_rho": 0.1}, sam)
    assert not same_settings("fedavg_aug_sam", dict(cfg), sam)
    # How a kept round was chosen matters only to a record that kept one; a record made before the setting
    # existed chose it on the clinics' own validation images.
    whole = {**cfg, "round_choice": "whole"}
    assert not same_settings("fedavg_aug", dict(cfg), whole)
    assert same_settings("fedavg_aug", dict(cfg), {**cfg, "round_choice": "own"})
    assert same_settings("pfednet_rc_cons", dict(cfg), whole, keeps_round=False)


def test_parse_methods() -> None:
    assert parse_methods("all") == tuple(METHODS)
    assert parse_methods(" fedavg, hsl ") == ("fedavg", "hsl")
    with pytest.raises(ValueError, match="unknown methods"):
        parse_methods("fedavg,fedsgd")


def test_pfednet_has_one_extra_round_for_its_stats() -> None:
    cfg = BenchConfig(rounds=12)
    assert total_rounds("pfednet", cfg) == 13
    assert total_rounds("pfednet_nograph", cfg) == 13  # the ablation keeps the stats round: same rounds
    assert total_rounds("fedavg", cfg) == 12
