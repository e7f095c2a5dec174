"""The node's state: studies through their life cycle, claims and runs, recovery, and filling the outbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.destination import Destination
from edge_node.delivery.outbox import Outbox
from edge_node.state.ingest_records import InstanceRecord
from edge_node.state.lifecycle import StudyEvent, StudyState
from edge_node.state.node_state import NodeState
from edge_node.state.runs import Claim, FindingRow, ModelInUse


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


def _sr(path: Path) -> ResultFile:
    return ResultFile(path, "1.2.840.10008.5.1.4.1.1.88.33", "1.2.3.99", "1.2.840.10008.1.2.1")


def _finish(
    state: NodeState,
    claim: Claim,
    event: StudyEvent,
    *,
    reason: str | None = None,
    findings: list[FindingRow] | None = None,
    outputs: list[ResultFile] | None = None,
    destinations: list[Destination] | None = None,
    model: ModelInUse | None = None,
) -> StudyState:
    """What the worker does: outbox entries and the run's outcome in one transaction."""
    with state.db.tx() as c:
        queued = Outbox.enqueue(c, claim.run_id, claim.study_id, outputs or [], destinations or [], 0.0)
        return state.runs.finish(
            c, claim, event, reason=reason, findings=findings or [], model=model, results_pending=queued > 0
        )


@pytest.fixture
def store(tmp_path: Path) -> NodeState:
    return NodeState.open(tmp_path / "edge.sqlite3")


def test_wal_and_sync_level(store: NodeState) -> None:
    assert store.db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.db.query("PRAGMA synchronous")[0][0] == 1  # NORMAL; FULL only for tx(durable=True)


def test_release_queues_and_claim_is_exclusive(store: NodeState, tmp_path: Path) -> None:
    sid, _ = store.ingest.record_instance(_rec("1.2.3", "1.2.3.1", tmp_path / "a"))
    store.ingest.record_instance(_rec("1.2.3", "1.2.3.2", tmp_path / "b"))
    assert store.runs.claim_next(quiet_seconds=3600) is None  # neither released nor quiet
    assert store.ingest.mark_complete([sid]) == 1
    claim = store.runs.claim_next(quiet_seconds=3600)
    assert claim is not None and claim.study_id == sid and len(claim.instances) == 2
    assert store.runs.claim_next(quiet_seconds=0) is None  # already owned
    state = _finish(
        store,
        claim,
        StudyEvent.DONE,
        findings=[FindingRow("1.2.3.1", 0.9, "pneumonia")],
        outputs=[_sr(tmp_path / "sr.dcm")],
        destinations=[Destination("PACS", "127.0.0.1", 104)],
        model=ModelInUse("m", "1.0.0", "CPUExecutionProvider"),
    )
    assert state is StudyState.DONE
    summary = store.status.recent_studies()[0]
    assert (summary.state, summary.results, summary.top_label, summary.runs) == (
        "done",
        "pending",
        "pneumonia",
        1,
    )
    assert store.status.counts()["outbox_pending"] == 1


def test_quiet_time_makes_a_study_ready(store: NodeState, tmp_path: Path) -> None:
    store.ingest.record_instance(_rec("1.2.4", "1.2.4.1", tmp_path / "a"), now=1000.0)
    assert store.runs.next_quiet_deadline(30) == 1030.0
    assert store.runs.claim_next(30, now=1029.0) is None
    assert store.runs.claim_next(30, now=1030.0) is not None


def test_instance_during_run_makes_the_study_run_again(store: NodeState, tmp_path: Path) -> None:
    sid, _ = store.ingest.record_instance(_rec("1.2.5", "1.2.5.1", tmp_path / "a"))
    store.ingest.mark_complete([sid])
    claim = store.runs.claim_next(0)
    assert claim is not None
    store.ingest.record_instance(_rec("1.2.5", "1.2.5.2", tmp_path / "b"))  # arrives while processing
    state = _finish(store, claim, StudyEvent.DONE)
    assert state is StudyState.RECEIVED
    again = store.runs.claim_next(0)
    assert again is not None and len(again.instances) == 2 and again.run_id != claim.run_id


def test_instance_after_done_reopens_the_study(store: NodeState, tmp_path: Path) -> None:
    sid, _ = store.ingest.record_instance(_rec("1.2.6", "1.2.6.1", tmp_path / "a"))
    store.ingest.mark_complete([sid])
    claim = store.runs.claim_next(0)
    assert claim is not None
    _finish(store, claim, StudyEvent.SKIPPED, reason="no CT")
    store.ingest.record_instance(_rec("1.2.6", "1.2.6.2", tmp_path / "b"))
    assert store.status.recent_studies()[0].state == "received"


def test_recover_requeues_interrupted_runs(tmp_path: Path) -> None:
    store = NodeState.open(tmp_path / "edge.sqlite3")
    sid, _ = store.ingest.record_instance(_rec("1.2.7", "1.2.7.1", tmp_path / "a"))
    store.ingest.mark_complete([sid])
    claim = store.runs.claim_next(0)
    assert claim is not None
    store.close()  # the "crash": the run row stays 'processing'
    store = NodeState.open(tmp_path / "edge.sqlite3")
    assert store.runs.recover() == [claim.run_id]
    assert store.status.recent_studies()[0].state == "queued"
    again = store.runs.claim_next(3600)
    assert again is not None and again.run_id != claim.run_id
    statuses = [r[0] for r in store.db.query("SELECT status FROM runs ORDER BY id")]
    assert statuses == ["interrupted", "processing"]


def test_a_study_that_kills_the_node_is_set_aside_after_max_attempts(tmp_path: Path) -> None:
    db = tmp_path / "edge.sqlite3"
    store = NodeState.open(db)
    sid, _ = store.ingest.record_instance(_rec("1.2.8", "1.2.8.1", tmp_path / "a"))
    store.ingest.mark_complete([sid])
    for attempt in range(1, 4):
        claim = store.runs.claim_next(0)
        assert claim is not None, attempt
        store.close()  # the run kills the node: its row stays 'processing'
        store = NodeState.open(db)
        store.runs.recover(max_attempts=3)
        expected = "failed" if attempt == 3 else "queued"
        assert store.status.recent_studies()[0].state == expected
    assert store.runs.claim_next(0) is None  # not retried at the next start
    (reason,) = store.db.query("SELECT reason FROM runs ORDER BY id DESC LIMIT 1")
    assert "set aside" in str(reason[0])
    # A new instance of the study is a new revision: it gets fresh attempts.
    store.ingest.record_instance(_rec("1.2.8", "1.2.8.2", tmp_path / "b"))
    store.ingest.mark_complete([sid])
    assert store.runs.claim_next(0) is not None
    store.close()


def test_duplicate_sop_instance_replaces_the_row(store: NodeState, tmp_path: Path) -> None:
    store.ingest.record_instance(_rec("1.2.8", "1.2.8.1", tmp_path / "a"))
    _, superseded = store.ingest.record_instance(_rec("1.2.9", "1.2.8.1", tmp_path / "b"))
    assert superseded == tmp_path / "a"
    assert store.status.counts()["instances"] == 1


def test_outbox_retry_then_sent(store: NodeState, tmp_path: Path) -> None:
    sid, _ = store.ingest.record_instance(_rec("1.3", "1.3.1", tmp_path / "a"))
    store.ingest.mark_complete([sid])
    claim = store.runs.claim_next(0)
    assert claim is not None
    _finish(
        store,
        claim,
        StudyEvent.DONE,
        outputs=[_sr(tmp_path / "sr.dcm")],
        destinations=[Destination("PACS", "h", 1), Destination("ARCHIVE", "h", 2)],
    )
    outbox = Outbox(store.db)
    due = outbox.due()
    assert len(due) == 2
    assert due[0].file == _sr(tmp_path / "sr.dcm")  # the row knows what C-STORE needs
    outbox.mark_retry([due[0].id], "refused", [10**10])
    assert [i.id for i in outbox.due()] == [due[1].id]
    outbox.mark_sent([due[1].id])
    assert store.status.recent_studies()[0].results == "pending"  # one destination still owed
    assert store.status.last_send_error() == "refused"
    assert outbox.next_try() == 10**10
    outbox.mark_sent([due[0].id])
    assert store.status.recent_studies()[0].results == "sent"


def test_a_released_study_waits_for_its_settle_time(store: NodeState, tmp_path: Path) -> None:
    study_id, _ = store.ingest.record_instance(_rec("1.2.5", "1.2.5.1", tmp_path / "a"), now=1000.0)
    store.ingest.mark_complete([study_id])
    assert store.runs.next_quiet_deadline(30, settle_seconds=2) == 1002.0
    assert not store.runs.has_ready(30, now=1001.9, settle_seconds=2)
    assert store.runs.claim_next(30, now=1001.9, settle_seconds=2) is None
    assert store.runs.claim_next(30, now=1002.0, settle_seconds=2) is not None
