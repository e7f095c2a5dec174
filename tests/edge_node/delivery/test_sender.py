"""The sending loop's log: a failure is reported once with its reason, not on every retry."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from edge_node.analysis.findings import Finding
from edge_node.analysis.report_template import write_fast_sr
from edge_node.analysis.result_file import ResultFile
from edge_node.analysis.result_warmup import synthetic_source
from edge_node.delivery.association_failure import RequestorNoiseFilter
from edge_node.delivery.destination import Destination
from edge_node.delivery.outbox import Outbox
from edge_node.delivery.sender import Link, Sender
from edge_node.delivery.store_scu import RESULT_SOP_CLASSES
from edge_node.errors import SendError
from edge_node.state.ingest_records import InstanceRecord
from edge_node.state.lifecycle import StudyEvent
from edge_node.state.node_state import NodeState
from tests.edge_node.conftest import free_port
from tests.support.onnxgen import make_bundle


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

    def connect(dest: Destination, calling_ae: str) -> Link:
        raise SendError(reasons.pop(0))

    sender = Sender(outbox, "EDGE", base_seconds=0.0001, max_seconds=0.0001, connect=connect)
    with caplog.at_level(logging.DEBUG, logger="edge_node.delivery.sender"):
        for _ in range(3):
            with state.db.tx() as c:
                c.execute("UPDATE outbox SET next_try = 0")
            sender.step()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # the first failure, then the changed reason; the repeat only at DEBUG
    assert "connection refused" in warnings[0] and "timed out" in warnings[1]
    state.close()


@dataclass
class CountingScp:
    """A real pynetdicom storage SCP that counts associations and refuses the SOP instances it is told to."""

    port: int
    associations: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)

    def on_store(self, event: Event) -> int:
        uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        if uid in self.refuse:
            return 0xA700
        self.stored.append(uid)
        return 0x0000

    def on_established(self, event: Event) -> None:
        self.associations.append(str(event.assoc.name))


@pytest.fixture
def scp() -> Iterator[CountingScp]:
    ae = AE(ae_title="PACS")
    for sop_class in RESULT_SOP_CLASSES:
        ae.add_supported_context(sop_class)
    counting = CountingScp(free_port())
    handlers: list[evt.EventHandlerType] = [
        (evt.EVT_C_STORE, counting.on_store),
        (evt.EVT_ESTABLISHED, counting.on_established),
    ]
    server = ae.start_server(("127.0.0.1", counting.port), block=False, evt_handlers=handlers)
    assert server is not None
    try:
        yield counting
    finally:
        server.shutdown()


def _queued_results(tmp_path: Path, state: NodeState, n: int, dest: Destination) -> list[ResultFile]:
    """``n`` real single-image studies, each done with one SR in the outbox for ``dest``."""
    manifest = make_bundle(tmp_path / "bundle").manifest
    source = tmp_path / "source.dcm"
    out = tmp_path / "results"
    out.mkdir()
    written = []
    for i in range(n):
        ds = synthetic_source()
        ds.save_as(source, enforce_file_format=True)
        sid, _ = state.ingest.record_instance(
            InstanceRecord(
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                "1.2.840.10008.1.2.1",
                "CR",
                tmp_path / f"i{i}",
                1,
                "SCU",
            )
        )
        state.ingest.mark_complete([sid])
        claim = state.runs.claim_next(0)
        assert claim is not None
        finding = Finding(
            str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), 0.5, "x", True
        )
        sr = write_fast_sr([ds], [finding], manifest, out)
        written.append(sr)
        with state.db.tx() as c:
            Outbox.enqueue(c, claim.run_id, claim.study_id, [sr], [dest], 0.0)
            state.runs.finish(
                c, claim, StudyEvent.DONE, reason=None, findings=[], model=None, results_pending=True
            )
    return written


def _pending(state: NodeState) -> int:
    return int(state.db.query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'pending'")[0]["n"])


def test_results_go_in_batches_over_one_association_kept_open(tmp_path: Path, scp: CountingScp) -> None:
    state = NodeState.open(tmp_path / "edge.sqlite3")
    dest = Destination("PACS", "127.0.0.1", scp.port)
    results = _queued_results(tmp_path, state, 7, dest)
    sender = Sender(Outbox(state.db), "EDGE", base_seconds=60, max_seconds=60, batch_max=3, linger=30)
    assert sender.step() == 0.0  # a full batch: more is due at once
    assert len(scp.stored) == 3 and _pending(state) == 4
    while _pending(state):
        sender.step()
    assert sorted(scp.stored) == sorted(r.sop_instance_uid for r in results)
    assert len(scp.associations) == 1  # three batches, one association
    assert sender.step() == pytest.approx(30, abs=1)  # nothing due: sleep until the association's linger ends
    sender.linger = 0
    assert sender.step() is None  # idle past its linger: released, nothing to wake for
    (tmp_path / "later").mkdir()
    more = _queued_results(tmp_path / "later", state, 1, dest)
    sender.step()
    assert more[0].sop_instance_uid in scp.stored and len(scp.associations) == 2
    state.close()


def test_a_refused_object_is_retried_alone_and_the_others_are_sent(tmp_path: Path, scp: CountingScp) -> None:
    state = NodeState.open(tmp_path / "edge.sqlite3")
    dest = Destination("PACS", "127.0.0.1", scp.port)
    results = _queued_results(tmp_path, state, 4, dest)
    scp.refuse.add(results[1].sop_instance_uid)
    sender = Sender(Outbox(state.db), "EDGE", base_seconds=60, max_seconds=60, linger=30)
    sender.step()
    rows = state.db.query("SELECT sop_instance_uid, state, attempts, last_error FROM outbox ORDER BY id")
    assert [r["state"] for r in rows] == ["sent", "pending", "sent", "sent"]
    assert rows[1]["attempts"] == 1 and "0xA700" in rows[1]["last_error"]
    assert len(scp.associations) == 1
    scp.refuse.clear()
    with state.db.tx() as c:
        c.execute("UPDATE outbox SET next_try = 0")
    sender.step()
    assert _pending(state) == 0 and sorted(scp.stored) == sorted(r.sop_instance_uid for r in results)
    assert len(scp.associations) == 1  # the refusal did not cost the association
    sender.close_links()
    state.close()


def test_a_lost_association_leaves_the_rest_pending(tmp_path: Path, scp: CountingScp) -> None:
    state = NodeState.open(tmp_path / "edge.sqlite3")
    dest = Destination("PACS", "127.0.0.1", scp.port)
    results = _queued_results(tmp_path, state, 3, dest)
    results[1].path.unlink()  # unreadable: a per-object failure, the association survives
    sender = Sender(Outbox(state.db), "EDGE", base_seconds=60, max_seconds=60, linger=30)
    sender.step()
    assert [r["state"] for r in state.db.query("SELECT state FROM outbox ORDER BY id")] == [
        "sent",
        "pending",
        "sent",
    ]
    sender.close_links()
    refused = Sender(Outbox(state.db), "EDGE", base_seconds=60, max_seconds=60)
    with state.db.tx() as c:
        c.execute("UPDATE outbox SET next_try = 0, dest_port = ?", (free_port(),))
    refused.step()  # nobody listens: the association never comes up, the entry waits for its retry
    (row,) = state.db.query("SELECT state, attempts, last_error FROM outbox WHERE state = 'pending'")
    assert row["attempts"] == 2 and "connection refused" in row["last_error"]
    state.close()
