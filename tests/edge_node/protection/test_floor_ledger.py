"""The clinic's privacy floor and its persisted ledger: refusals with reasons, a budget that holds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edge_node.protection import LedgerError, PrivacyFloor, PrivacyGate, PrivacyLedger, TaskRefused
from edge_node.protection.pipeline import ProtectionPipeline
from edge_node.protocol.accountant import GaussianRelease, epsilon_of
from edge_node.protocol.protection import ProtectionSpec
from edge_node.protocol.updates import UpdateKind


def _spec(**kw: object) -> ProtectionSpec:
    return ProtectionSpec.model_validate({"cohort_size": 10, "clip_norm": 1.0, "epsilon": 2.0, **kw})


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_round() -> None:
    floor = PrivacyFloor(require_secure_aggregation=True)
    reason = floor.refusal(_spec())
    assert reason is not None and "secure aggregation" in reason
    assert floor.refusal(_spec(secure_aggregation=True)) is None


def test_a_cohort_below_the_clinics_minimum_is_refused_with_the_reason() -> None:
    floor = PrivacyFloor(min_cohort=5)
    assert floor.refusal(_spec(cohort_size=3)) == (
        "the round asks 3 clinics but this clinic takes part only in rounds of at least 5"
    )
    assert floor.refusal(_spec(cohort_size=5)) is None


def test_floor_refuses_kinds_missing_noise_and_too_much_epsilon() -> None:
    floor = PrivacyFloor(
        max_epsilon_per_round=1.0, allowed_kinds=frozenset({UpdateKind.HEAD_DELTA, UpdateKind.STATS})
    )
    assert "weights_delta" in (floor.refusal(_spec(epsilon=0.5)) or "")
    head = {"kind": UpdateKind.HEAD_DELTA}
    assert "adds no noise" in (floor.refusal(_spec(epsilon=None, clip_norm=None, **head)) or "")
    assert "more than this clinic's 1 per round" in (floor.refusal(_spec(**head)) or "")
    assert "delta" in (floor.refusal(_spec(epsilon=0.5, delta=1e-3, **head)) or "")
    assert floor.refusal(_spec(epsilon=0.5, **head)) is None
    with pytest.raises(ValueError, match="cannot exceed"):
        PrivacyFloor(max_epsilon_per_round=5.0, max_epsilon_total=1.0)


def test_the_ledger_refuses_the_task_that_would_pass_the_budget_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    floor = PrivacyFloor(max_epsilon_per_round=2.0, max_epsilon_total=4.0)
    gate = PrivacyGate.in_data_dir(floor, tmp_path)
    spec = _spec(epsilon=2.0)
    sigma = gate.pipeline.noise_multiplier(spec)
    assert sigma is not None
    # Gaussian releases compose better than ε adds up: 2 rounds at ε=2 cost ~2.9, 3 rounds ~3.6, 4 ~4.2
    expected = [epsilon_of([GaussianRelease(sigma, n)], 1e-5) for n in (1, 2, 3, 4)]
    assert expected[2] < 4.0 < expected[3]
    update = {"w": np.ones(8)}
    for rnd in (1, 2, 3):
        out = gate.release(f"task-{rnd}", rnd, update, spec)
        assert out.payload_bytes > 0
        assert gate.ledger.spent() == pytest.approx(expected[rnd - 1], rel=1e-6)
    # a restart: a new gate over the same data dir knows what was spent
    again = PrivacyGate.in_data_dir(floor, tmp_path)
    assert again.ledger.spent() == pytest.approx(expected[2], rel=1e-6)
    reason = again.refusal(spec)
    assert reason is not None and "over its budget of 4" in reason
    with pytest.raises(TaskRefused, match="over its budget"):
        again.release("task-4", 4, update, spec)
    # and the ledger itself refuses at charge time, in one transaction
    with pytest.raises(TaskRefused, match="over its budget"):
        again.ledger.charge(
            "task-4",
            round=4,
            kind="weights_delta",
            noise_multiplier=sigma,
            epsilon=2.0,
            delta=1e-5,
            payload_bytes=10,
            max_total=4.0,
        )
    assert [e.task_id for e in again.ledger.entries()] == ["task-1", "task-2", "task-3"]
    report = again.ledger.report(4.0)
    assert report.startswith("3 updates left this clinic (")
    assert f"Privacy spent: epsilon {expected[2]:.3g} at delta 1e-05." in report
    assert "budget is epsilon 4" in report
    # a retried task is charged once
    again.ledger.charge(
        "task-3",
        round=3,
        kind="weights_delta",
        noise_multiplier=sigma,
        epsilon=2.0,
        delta=1e-5,
        payload_bytes=10,
        max_total=4.0,
    )
    assert len(again.ledger.entries()) == 3


def test_an_unnoised_update_makes_the_total_unbounded(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite3", delta=1e-5)
    assert ledger.spent() == 0.0
    assert ledger.report() == "No update has left this clinic yet; no privacy has been spent."
    ledger.charge(
        "t",
        round=1,
        kind="stats",
        noise_multiplier=None,
        epsilon=None,
        delta=1e-5,
        payload_bytes=3,
        max_total=None,
    )
    assert math.isinf(ledger.spent())
    assert "no finite bound" in ledger.report(10.0)
    gate = PrivacyGate(PrivacyFloor(max_epsilon_total=10.0), ledger, ProtectionPipeline())
    assert "over its budget" in (gate.refusal(_spec()) or "")
    (tmp_path / "dir").mkdir()
    with pytest.raises(LedgerError, match="cannot open"):
        PrivacyLedger(tmp_path / "dir", delta=1e-5)
