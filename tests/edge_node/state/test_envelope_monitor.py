"""The input envelope monitor: per model version, the latest analysed images and how many lay outside the
envelope, kept in the node's database across restarts, and a warning only when a clinic like the validation
set would not show that many (the protocol's drift alarm), from MIN_IMAGES images on."""

from __future__ import annotations

import math
import sqlite3
from fractions import Fraction
from itertools import count
from pathlib import Path

import pytest

from edge_node.protocol.envelope import DRIFT_ALARM_P, DRIFT_TOLERANCE
from edge_node.state.database import Database
from edge_node.state.envelope_monitor import MIN_IMAGES, WINDOW, EnvelopeMonitor
from edge_node.state.ingest_records import InstanceRecord
from edge_node.state.lifecycle import StudyEvent
from edge_node.state.node_state import NodeState
from edge_node.state.runs import FindingRow, ModelInUse
from edge_node.state.schema import SCHEMA_VERSION
from edge_node.uplink.sync import heartbeat_counts

QUANTILE = 0.99
_uids = count(1)


def exact_tail(k: int, n: int, p: Fraction) -> Fraction:
    """P(X >= k), X ~ Binomial(n, p), in exact rational arithmetic (the reference for the float version)."""
    return sum((Fraction(math.comb(n, j)) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1)), Fraction(0))


def first_alarming(n: int, p: Fraction) -> int:
    """The fewest images outside, of ``n``, that a rate of ``p`` gives less often than DRIFT_ALARM_P."""
    return next(k for k in range(n + 1) if exact_tail(k, n, p) < Fraction(DRIFT_ALARM_P))


def record_run(
    state: NodeState,
    outside: list[bool],
    *,
    model: tuple[str, str] = ("pneumonia-student", "1.0.0"),
    quantile: float | None = QUANTILE,
) -> int:
    """One study analysed by ``model``: one finding per entry of ``outside``, recorded as the worker does."""
    study = f"1.2.826.0.1.3680043.8.498.{next(_uids)}"
    sops = [f"{study}.1.{i}" for i in range(len(outside) or 1)]
    for sop in sops:
        state.ingest.record_instance(
            InstanceRecord(study, study + ".1", sop, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1", "CR",
                           Path("/nonexistent") / sop, 10, "TESTSCU")
        )  # fmt: skip
    claim = state.runs.claim_next(quiet_seconds=0.0, now=1e12)
    assert claim is not None and claim.study_uid == study
    findings = [
        FindingRow(sop, 0.5, "normal")
        if quantile is None  # a bundle without an envelope: no result to record
        else FindingRow(sop, 0.5, "normal", out, 2.0 if out else 0.5)
        for sop, out in zip(sops, outside, strict=False)
    ]
    in_use = ModelInUse(model[0], model[1], "CPUExecutionProvider", envelope_quantile=quantile)
    with state.db.tx() as c:
        state.runs.finish(c, claim, StudyEvent.DONE, reason=None, findings=findings, model=in_use)
    return claim.run_id


@pytest.fixture
def state(tmp_path: Path) -> NodeState:
    return NodeState.open(tmp_path / "edge.sqlite3")


def test_the_window_counts_the_latest_images_of_each_model_version(state: NodeState) -> None:
    monitor = state.envelope
    assert monitor.window_of("pneumonia-student", "1.0.0") is None  # nothing analysed yet
    record_run(state, [False] * 150)
    record_run(state, [True] * 30 + [False] * 70)
    record_run(state, [True] * 5, model=("pneumonia-student", "2.0.0"))
    record_run(state, [False, False], quantile=None, model=("old-bundle", "0.9"))  # no envelope: not counted
    w = monitor.window_of("pneumonia-student", "1.0.0")
    assert w is not None
    # 250 analysed, the window holds the latest 200: the last 100 of the second run and 100 of the first.
    assert (w.window, w.images, w.outside) == (WINDOW, WINDOW, 30)
    assert w.rate == pytest.approx(0.15) and w.expected_rate == pytest.approx(0.01)
    # Only what the window holds: one more run of 200 inside pushes every earlier one out.
    record_run(state, [False] * 200)
    w = monitor.window_of("pneumonia-student", "1.0.0")
    assert w is not None and (w.images, w.outside) == (200, 0) and w.warning() is None
    assert [(x.model_id, x.model_version, x.images, x.outside) for x in monitor.recent()] == [
        ("pneumonia-student", "1.0.0", 200, 0),
        ("pneumonia-student", "2.0.0", 5, 5),
    ]
    assert monitor.window_of("old-bundle", "0.9") is None
    small = EnvelopeMonitor(state.db, window=10)
    w = small.window_of("pneumonia-student", "1.0.0")
    assert w is not None and (w.window, w.images) == (10, 10)


def test_the_window_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "edge.sqlite3"
    state = NodeState.open(path)
    record_run(state, [True] * 12 + [False] * 40)
    before = state.envelope.window_of("pneumonia-student", "1.0.0")
    state.close()
    state = NodeState.open(path)
    try:
        after = state.envelope.window_of("pneumonia-student", "1.0.0")
        assert after == before and after is not None and (after.images, after.outside) == (52, 12)
        record_run(state, [True])
        again = state.envelope.window_of("pneumonia-student", "1.0.0")
        assert again is not None and (again.images, again.outside) == (53, 13)
    finally:
        state.close()


def test_a_warning_only_when_a_clinic_like_the_validation_set_would_not_show_that_many(
    tmp_path: Path,
) -> None:
    # The alarm tolerates DRIFT_TOLERANCE times the chance rate (a clinic at the edge of the validation set).
    p = Fraction(DRIFT_TOLERANCE) * (1 - Fraction(QUANTILE))
    for n in (MIN_IMAGES, WINDOW):
        k = first_alarming(n, p)
        assert Fraction(k, n) > p  # well above even the tolerated rate
        for outside, warned in ((k - 1, False), (k, True)):
            state = NodeState.open(tmp_path / f"{n}-{outside}.sqlite3")
            try:
                record_run(state, [True] * outside + [False] * (n - outside))
                w = state.envelope.window_of("pneumonia-student", "1.0.0")
            finally:
                state.close()
            assert w is not None and (w.images, w.outside) == (n, outside)
            assert w.drifting is warned and (w.warning() is not None) is warned, (n, outside)
            assert w.to_json()["drifting"] is warned
    # Too few images: however many lie outside, no warning yet.
    state = NodeState.open(tmp_path / "few.sqlite3")
    try:
        record_run(state, [True] * (MIN_IMAGES - 1))
        w = state.envelope.window_of("pneumonia-student", "1.0.0")
        assert w is not None and w.warning() is None
        record_run(state, [True])
        w = state.envelope.window_of("pneumonia-student", "1.0.0")
    finally:
        state.close()
    assert w is not None and w.images == MIN_IMAGES and w.warning() is not None
    text = w.warning() or ""
    assert "30 of the last 30 images" in text and "pneumonia-student 1.0.0" in text and "1.0%" in text


def test_findings_with_an_envelope_result_need_the_models_quantile(state: NodeState) -> None:
    study = "1.2.826.0.1.3680043.8.498.999999"
    state.ingest.record_instance(
        InstanceRecord(study, study + ".1", study + ".1.1", "1.2.840.10008.5.1.4.1.1.1",
                       "1.2.840.10008.1.2.1", "CR", Path("/nonexistent/x"), 10, "TESTSCU")
    )  # fmt: skip
    claim = state.runs.claim_next(quiet_seconds=0.0, now=1e12)
    assert claim is not None
    findings = [FindingRow(study + ".1.1", 0.5, "normal", True, 3.0)]
    with pytest.raises(ValueError, match="envelope quantile"), state.db.tx() as c:
        state.runs.finish(
            c, claim, StudyEvent.DONE, reason=None, findings=findings, model=ModelInUse("m", "1", "CPU")
        )
    assert state.db.query("SELECT COUNT(*) FROM findings")[0][0] == 0  # the transaction rolled back


def test_an_older_database_gains_the_envelope_table(tmp_path: Path) -> None:
    path = tmp_path / "edge.sqlite3"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE envelope_results")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    state = NodeState.open(path)
    try:
        assert state.db.query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"] == str(
            SCHEMA_VERSION
        )
        assert state.envelope.recent() == []
        record_run(state, [True, False])
        assert [(w.images, w.outside) for w in state.envelope.recent()] == [(2, 1)]
    finally:
        state.close()


def test_the_heartbeat_carries_the_active_models_counts_only(state: NodeState, tmp_path: Path) -> None:
    record_run(state, [True] * 3 + [False] * 7)
    assert "envelope_images" not in heartbeat_counts(state, {"pending": 0})  # no active model yet
    row = state.models.add("pneumonia-student", "1.0.0", tmp_path, "0" * 64, "test")
    state.models.activate(row, "install")
    counts = heartbeat_counts(state, {"pending": 0, "sent": 2})
    assert counts["envelope_images"] == 10 and counts["envelope_outside"] == 3
    assert counts["envelope_drifting"] == 0  # 10 images are too few to raise the alarm
    assert counts["updates_sent"] == 2 and counts["done"] == 1 and len(counts) <= 32
    assert all(isinstance(v, int) for v in counts.values())
    other = state.models.add("plain", "1.0.0", tmp_path, "1" * 64, "test")
    state.models.activate(other, "install")  # a model without an envelope: no envelope counters
    assert "envelope_images" not in heartbeat_counts(state, {})
