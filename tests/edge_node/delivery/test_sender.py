"""The sending loop's log: a failure is reported once with its reason, not on every retry."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.association_failure import RequestorNoiseFilter
from edge_node.delivery.destination import Destination
from edge_node.delivery.outbox import Outbox
from edge_node.delivery.sender import Sender
from edge_node.errors import SendError
from edge_node.state.ingest_records import InstanceRecord
from edge_node.state.lifecycle import StudyEvent
from edge_node.state.node_state import NodeState


def test_pynetdicom_lines_about_a_failed_request_are_dropped() -> None:
    noise = RequestorNoiseFilter()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("pynetdicom.transport", logging.ERROR, "", 0, message, None, None)

    assert not noise.filter(record("Association request failed: unable to connect to remote"))
    assert not noise.filter(record("TCP Initialisation Error: Connection refused"))
    assert noise.filter(record("Invalid event 'Evt3' for the current state"))


def test_a_repeated_failure_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = NodeState.open(tmp_path / "edge.sqlite3")
    sid, _ = state.ingest.record_instance(
        InstanceRecord(
            "1.2",
            "1.2.1",
            "1.2.1.1",
            "1.2.840.10008.5.1.4.1.1.1",
            "1.2.840.10008.1.2.1",
            "CR",
            tmp_path / "a",
            1,
            "SCU",
        )
    )
    state.ingest.mark_complete([sid])
    claim = state.runs.claim_next(0)
    assert claim is not None
    sr = ResultFile(tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", "1.2.840.10008.1.2.1")
    with state.db.tx() as c:
        Outbox.enqueue(c, claim.run_id, claim.study_id, [sr], [Destination("PACS", "h", 1)], 0.0)
        state.runs.finish(
            c, claim, StudyEvent.DONE, reason=None, findings=[], model=None, results_pending=True
        )
    outbox = Outbox(state.db)
    reasons = ["PACS@h:1: connection refused", "PACS@h:1: connection refused", "PACS@h:1: timed out"]

    def send(files: Sequence[ResultFile], dest: Destination, calling_ae: str) -> None:
        assert [f.path for f in files] == [sr.path]
        raise SendError(reasons.pop(0))

    sender = Sender(outbox, "EDGE", base_seconds=0.0001, max_seconds=0.0001, send=send)
    with caplog.at_level(logging.DEBUG, logger="edge_node.delivery.sender"):
        for _ in range(3):
            with state.db.tx() as c:
                c.execute("UPDATE outbox SET next_try = 0")
            sender.step()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # the first failure, then the changed reason; the repeat only at DEBUG
    assert "connection refused" in warnings[0] and "timed out" in warnings[1]
    state.close()
