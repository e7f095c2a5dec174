"""The input envelope monitor: per model version, the latest analysed images and how many lay outside the
envelope, kept in the node's database across restarts, and a warning only when a clinic like the validation
set would not show that many (the protocol's drift alarm), from MIN_IMAGES images on."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from fractions import Fraction
from itertools import count
from pathlib import Path

import pytest

from edge_node.protocol.envelope import DRIFT_ALARM_P, DRIFT_TOLERANCE
from edge_node.state.database import Database
from edge_node.state.envelope_monitor import MIN_IMAGES, WINDOW, EnvelopeMonitor, EnvelopeResult
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
    grey: Sequence[tuple[bool, bool]] | None = None,
) -> int:
    """One study analysed by ``model``: one finding per entry of ``outside``, recorded as the worker does.
    ``grey``: each image's intensity result (outside the intensity part, looks negative), for an envelope
    with an intensity part."""
    study = f"1.2.826.0.1.3680043.8.498.{next(_uids)}"
    sops = [f"{study}.1.{i}" for i in range(len(outside) or 1)]
    for sop in sops:
        state.ingest.record_instance(
            InstanceRecord(study, study + ".1", sop, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1", "CR",
                           Path("/nonexistent") / sop, 10, "TESTSCU")
        )  # fmt: skip
    claim = state.runs.claim_next(quiet_seconds=0.0, now=1e12)
    assert claim is not None and claim.study_uid == study
    intensity: Sequence[tuple[bool | None, bool | None]] = grey or [(None, None)] * len(outside)
    findings = [
        FindingRow(sop, 0.5, "normal")
        if quantile is None  # a bundle without an envelope: no result to record
        else FindingRow(sop, 0.5, "normal", EnvelopeResult(sop, out, 2.0 if out else 0.5, grey_out, negative))
        for sop, out, (grey_out, negative) in zip(sops, outside, intensity, strict=False)
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
    findings = [FindingRow(study + ".1.1", 0.5, "normal", EnvelopeResult(study + ".1.1", True, 3.0))]
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
    assert "envelope_negative" not in counts  # the envelope has no intensity part: nothing to say
    assert counts["envelope_kept"] == 0  # these results were recorded without features: none kept
    assert counts["updates_sent"] == 2 and counts["done"] == 1 and len(counts) <= 32
    assert all(isinstance(v, int) for v in counts.values())
    other = state.models.add("plain", "1.0.0", tmp_path, "1" * 64, "test")
    state.models.activate(other, "install")  # a model without an envelope: no envelope counters
    assert "envelope_images" not in heartbeat_counts(state, {})


def test_a_window_of_images_like_negatives_names_the_display_header(tmp_path: Path) -> None:
    cases = {
        # (images outside, of them outside the intensity part, of those looking negative) -> looks negative
        "inverted": ((60, 60, 50), True),
        "half": ((60, 60, 30), True),  # at least half of those outside the intensity part
        "few negative": ((60, 60, 10), False),
        "just under half": ((60, 60, 29), False),
        "embedding only": ((60, 0, 0), False),  # outside, but the grey values are like the validation's
        "chance": ((4, 4, 4), False),  # no more outside the intensity part than chance allows
    }
    for name, ((outside, grey_outside, negative), looks) in cases.items():
        grey = [(True, True)] * negative + [(True, False)] * (grey_outside - negative)
        grey += [(False, False)] * (WINDOW - grey_outside)
        state = NodeState.open(tmp_path / f"{name}.sqlite3")
        try:
            record_run(state, [True] * outside + [False] * (WINDOW - outside), grey=grey)
            w = state.envelope.window_of("pneumonia-student", "1.0.0")
        finally:
            state.close()
        assert w is not None and (w.images, w.outside) == (WINDOW, outside)
        assert (w.intensity_outside, w.negative) == (grey_outside, negative), name
        assert w.looks_negative is looks, name
        # Each part lets 1 - quantile through by chance: up to twice that outside the envelope.
        assert w.expected_rate == pytest.approx(2 * (1 - QUANTILE)) and w.expected_words == "up to 2.0%"
        doc = w.to_json()
        assert (doc["intensity_outside"], doc["negative"], doc["looks_negative"]) == (
            grey_outside,
            negative,
            looks,
        )
        warning = w.warning()
        assert (warning is not None) is w.drifting, name
        said = f"{negative} of the {grey_outside} images whose grey values were unlike the validation images'"
        assert (said in (warning or "")) is looks, name
        if looks:
            assert "MONOCHROME1 or MONOCHROME2, Presentation LUT Shape" in (warning or "")
            assert "up to 2.0% expected by chance" in (warning or "")
    # Too few images: all negative, and still no diagnosis yet.
    state = NodeState.open(tmp_path / "few.sqlite3")
    try:
        record_run(state, [True] * (MIN_IMAGES - 1), grey=[(True, True)] * (MIN_IMAGES - 1))
        w = state.envelope.window_of("pneumonia-student", "1.0.0")
        assert w is not None and w.negative == MIN_IMAGES - 1 and not w.looks_negative
        record_run(state, [True], grey=[(True, True)])
        w = state.envelope.window_of("pneumonia-student", "1.0.0")
        assert w is not None and w.looks_negative
    finally:
        state.close()


def test_without_an_intensity_part_the_window_has_no_intensity_counts(state: NodeState) -> None:
    record_run(state, [True] * 40)
    w = state.envelope.window_of("pneumonia-student", "1.0.0")
    assert w is not None and w.drifting
    assert (w.intensity_outside, w.negative, w.looks_negative) == (None, None, False)
    assert w.expected_rate == pytest.approx(1 - QUANTILE) and w.expected_words == "about 1.0%"
    doc = w.to_json()
    assert (doc["intensity_outside"], doc["negative"], doc["looks_negative"]) == (None, None, False)
    assert "grey values" not in (w.warning() or "grey values")
    rows = state.db.query("SELECT intensity_outside, negative FROM envelope_results")
    assert len(rows) == 40 and all(tuple(r) == (None, None) for r in rows)


def test_a_version_3_database_keeps_its_rows_and_gains_the_intensity_columns(tmp_path: Path) -> None:
    path = tmp_path / "edge.sqlite3"
    state = NodeState.open(path)
    record_run(state, [True] * 3 + [False] * 7)
    state.close()
    # The envelope_results table as schema version 3 had it: no intensity columns (nor version 5's).
    conn = sqlite3.connect(path)
    for column in ("intensity_outside", "negative", "embedding", "intensity_features"):
        conn.execute(f"ALTER TABLE envelope_results DROP COLUMN {column}")
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.commit()
    columns = [r[1] for r in conn.execute("PRAGMA table_info(envelope_results)")]
    before = conn.execute("SELECT * FROM envelope_results ORDER BY id").fetchall()
    conn.close()
    assert "intensity_outside" not in columns and "negative" not in columns and len(before) == 10

    state = NodeState.open(path)
    try:
        version = state.db.query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"]
        assert version == str(SCHEMA_VERSION)  # every later version's columns added at once
        rows = state.db.query(
            f"SELECT {', '.join(columns)}, intensity_outside, negative FROM envelope_results ORDER BY id"
        )
        assert [tuple(r)[: len(columns)] for r in rows] == before  # every row as it was
        assert all((r["intensity_outside"], r["negative"]) == (None, None) for r in rows)
        w = state.envelope.window_of("pneumonia-student", "1.0.0")
        assert w is not None and (w.images, w.outside, w.intensity_outside, w.negative) == (10, 3, None, None)
        # The node now judges grey values: the counts are over the images that have a result.
        record_run(state, [True, True, False], grey=[(True, True), (True, False), (False, False)])
        w = state.envelope.window_of("pneumonia-student", "1.0.0")
        assert w is not None and (w.images, w.outside, w.intensity_outside, w.negative) == (13, 5, 2, 1)
    finally:
        state.close()
    # Opened again (as every receiver process does), nothing is added twice.
    Database(path).close()


def test_a_version_3_node_can_still_record_in_a_version_4_database(tmp_path: Path) -> None:
    path = tmp_path / "edge.sqlite3"
    Database(path).close()
    conn = sqlite3.connect(path)
    # The INSERT of schema version 3 names its columns: the new ones stay NULL.
    conn.execute(
        "INSERT INTO envelope_results (run_id, sop_instance_uid, model_id, model_version, outside, ratio,"
        " quantile) VALUES (1, '1.2.3', 'm', '1', 1, 2.0, 0.99)"
    )
    conn.commit()
    assert conn.execute("SELECT intensity_outside, negative FROM envelope_results").fetchall() == [
        (None, None)
    ]
    conn.close()


def test_the_heartbeat_says_whether_the_active_models_images_look_negative(
    state: NodeState, tmp_path: Path
) -> None:
    row = state.models.add("pneumonia-student", "1.0.0", tmp_path, "0" * 64, "test")
    state.models.activate(row, "install")
    record_run(state, [False] * 100, grey=[(False, False)] * 100)
    counts = heartbeat_counts(state, {})
    assert (counts["envelope_drifting"], counts["envelope_negative"]) == (0, 0)
    record_run(
        state,
        [True] * 60 + [False] * 40,
        grey=[(True, True)] * 50 + [(True, False)] * 10 + [(False, False)] * 40,
    )
    counts = heartbeat_counts(state, {"pending": 0, "sent": 0})
    assert (counts["envelope_images"], counts["envelope_outside"]) == (200, 60)
    assert (counts["envelope_drifting"], counts["envelope_negative"]) == (1, 1)
    assert len(counts) <= 32 and all(isinstance(v, int) for v in counts.values())
