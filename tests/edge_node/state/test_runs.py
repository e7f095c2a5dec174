"""The SQLite store: studies through their life cycle, claims and runs, recovery, and filling the outbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node.store import FindingRow, InstanceRecord, Store
from edge_node.study import StudyEvent, StudyState


def _rec(study: str, sop: str, path: Path) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study,
        series_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT",
        path=path,
        size=10,
        calling_ae="TESTSCU",
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "edge.sqlite3")


def test_wal_and_sync_level(store: Store) -> None:
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.query("PRAGMA synchronous")[0][0] == 1  # NORMAL; FULL only for tx(durable=True)


def test_release_queues_and_claim_is_exclusive(store: Store, tmp_path: Path) -> None:
    sid, _ = store.record_instance(_rec("1.2.3", "1.2.3.1", tmp_path / "a"))
    store.record_instance(_rec("1.2.3", "1.2.3.2", tmp_path / "b"))
    assert store.claim_next(quiet_seconds=3600) is None  # neither released nor quiet
    assert store.mark_complete([sid]) == 1
    claim = store.claim_next(quiet_seconds=3600)
    assert claim is not None and claim.study_id == sid and len(claim.instances) == 2
    assert store.claim_next(quiet_seconds=0) is None  # already owned
    state = store.finish_run(
        claim,
        StudyEvent.DONE,
        reason=None,
        findings=[FindingRow("1.2.3.1", 0.9, "pneumonia")],
        outputs=[tmp_path / "sr.dcm"],
        destinations=[("PACS", "127.0.0.1", 104)],
        model=("m", "1.0.0", "CPUExecutionProvider"),
    )
    assert state is StudyState.DONE
    summary = store.recent_studies()[0]
    assert (summary.state, summary.results, summary.top_label, summary.runs) == (
        "done",
        "pending",
        "pneumonia",
        1,
    )
    assert store.counts()["outbox_pending"] == 1


def test_quiet_time_makes_a_study_ready(store: Store, tmp_path: Path) -> None:
    store.record_instance(_rec("1.2.4", "1.2.4.1", tmp_path / "a"), now=1000.0)
    assert store.next_quiet_deadline(30) == 1030.0
    assert store.claim_next(30, now=1029.0) is None
    assert store.claim_next(30, now=1030.0) is not None


def test_instance_during_run_makes_the_study_run_again(store: Store, tmp_path: Path) -> None:
    sid, _ = store.record_instance(_rec("1.2.5", "1.2.5.1", tmp_path / "a"))
    store.mark_complete([sid])
    claim = store.claim_next(0)
    assert claim is not None
    store.record_instance(_rec("1.2.5", "1.2.5.2", tmp_path / "b"))  # arrives while processing
    state = store.finish_run(
        claim, StudyEvent.DONE, reason=None, findings=[], outputs=[], destinations=[], model=None
    )
    assert state is StudyState.RECEIVED
    again = store.claim_next(0)
    assert again is not None and len(again.instances) == 2 and again.run_id != claim.run_id


def test_instance_after_done_reopens_the_study(store: Store, tmp_path: Path) -> None:
    sid, _ = store.record_instance(_rec("1.2.6", "1.2.6.1", tmp_path / "a"))
    store.mark_complete([sid])
    claim = store.claim_next(0)
    assert claim is not None
    store.finish_run(
        claim, StudyEvent.SKIPPED, reason="no CT", findings=[], outputs=[], destinations=[], model=None
    )
    store.record_instance(_rec("1.2.6", "1.2.6.2", tmp_path / "b"))
    assert store.recent_studies()[0].state == "received"


def test_recover_requeues_interrupted_runs(tmp_path: Path) -> None:
    store = Store(tmp_path / "edge.sqlite3")
    sid, _ = store.record_instance(_rec("1.2.7", "1.2.7.1", tmp_path / "a"))
    store.mark_complete([sid])
    claim = store.claim_next(0)
    assert claim is not None
    store.close()  # the "crash": the run row stays 'processing'
    store = Store(tmp_path / "edge.sqlite3")
    assert store.recover() == [claim.run_id]
    assert store.recent_studies()[0].state == "queued"
    again = store.claim_next(3600)
    assert again is not None and again.run_id != claim.run_id
    statuses = [r[0] for r in store.query("SELECT status FROM runs ORDER BY id")]
    assert statuses == ["interrupted", "processing"]


def test_duplicate_sop_instance_replaces_the_row(store: Store, tmp_path: Path) -> None:
    store.record_instance(_rec("1.2.8", "1.2.8.1", tmp_path / "a"))
    _, superseded = store.record_instance(_rec("1.2.9", "1.2.8.1", tmp_path / "b"))
    assert superseded == tmp_path / "a"
    assert store.counts()["instances"] == 1


def test_outbox_retry_then_sent(store: Store, tmp_path: Path) -> None:
    sid, _ = store.record_instance(_rec("1.3", "1.3.1", tmp_path / "a"))
    store.mark_complete([sid])
    claim = store.claim_next(0)
    assert claim is not None
    store.finish_run(
        claim,
        StudyEvent.DONE,
        reason=None,
        findings=[],
        outputs=[tmp_path / "sr.dcm"],
        destinations=[("PACS", "h", 1), ("ARCHIVE", "h", 2)],
        model=None,
    )
    due = store.outbox.due()
    assert len(due) == 2
    store.outbox.mark_retry([due[0].id], "refused", [10**10])
    assert [i.id for i in store.outbox.due()] == [due[1].id]
    store.outbox.mark_sent([due[1].id])
    assert store.recent_studies()[0].results == "pending"  # one destination still owed
    assert store.outbox.last_error() == "refused"
    assert store.outbox.next_try() == 10**10
