"""The label store on a real SQLite database: checks, overwrite with history, and what learners read."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_node.errors import LabelError
from edge_node.state.database import Database
from edge_node.state.ingest_records import InstanceRecord
from edge_node.state.labels import LabelInput, LabelStore
from edge_node.state.lifecycle import StudyEvent
from edge_node.state.node_state import NodeState
from edge_node.state.runs import FindingRow, ModelInUse
from edge_node.state.schema import SCHEMA_VERSION

CLASSES = ("normal", "pneumonia")


def _spool_file(root: Path, name: str) -> Path:
    path = root / name
    path.write_bytes(b"x" * 10)
    return path


def _receive(state: NodeState, study: str, sop: str, path: Path) -> None:
    state.ingest.record_instance(
        InstanceRecord(
            study,
            study + ".1",
            sop,
            "1.2.840.10008.5.1.4.1.1.1",
            "1.2.840.10008.1.2.1",
            "CR",
            path,
            10,
            "TESTSCU",
        )
    )


def _analyse(state: NodeState, analysed: list[str]) -> None:
    """Run the next ready study as the worker does, with findings for ``analysed`` instances only."""
    claim = state.runs.claim_next(0.0, now=1e12)
    assert claim is not None
    with state.db.tx() as c:
        state.runs.finish(
            c,
            claim,
            StudyEvent.DONE,
            reason=None,
            findings=[FindingRow(sop, 0.7, "pneumonia") for sop in analysed],
            model=ModelInUse("m", "1.0.0", "CPUExecutionProvider"),
        )


@pytest.fixture
def state(tmp_path: Path) -> NodeState:
    return NodeState.open(tmp_path / "edge.sqlite3")


def test_a_label_must_be_a_class_of_the_model(state: NodeState) -> None:
    store = LabelStore(state.db, CLASSES)
    with pytest.raises(LabelError, match=r"unknown label 'cat'.*'normal', 'pneumonia'"):
        store.set_labels([LabelInput("study", "1.2.3", "cat")], source="page", who="t")
    with pytest.raises(LabelError, match="UID of digits and dots"):
        store.set_labels([LabelInput("study", "Smith^John", "normal")], source="page", who="t")
    with pytest.raises(LabelError, match="no model is installed"):
        LabelStore(state.db).set_labels([LabelInput("study", "1.2.3", "normal")], source="page", who="t")
    with pytest.raises(LabelError, match="received no study"):
        store.label_study("1.2.3", "normal", source="page", who="t")
    # One bad label refuses them all: nothing of the batch is stored.
    with pytest.raises(LabelError):
        store.set_labels(
            [LabelInput("study", "1.2.3", "normal"), LabelInput("study", "1.2.4", "nope")],
            source="import",
            who="t",
        )
    assert store.labels() == [] and store.history() == []


def test_relabeling_overwrites_and_keeps_the_history(state: NodeState, tmp_path: Path) -> None:
    store = LabelStore(state.db, CLASSES)
    _receive(state, "1.2.3", "1.2.3.1.1", _spool_file(tmp_path, "a.dcm"))
    assert store.label_study("1.2.3", "pneumonia", source="page", who="dr a")
    assert not store.label_study("1.2.3", "pneumonia", source="page", who="dr a")  # same: no change
    assert store.label_study("1.2.3", "normal", source="page", who="dr b")
    [record] = store.labels()
    assert (record.scope, record.uid, record.label, record.who) == ("study", "1.2.3", "normal", "dr b")
    assert [(h.label, h.previous, h.who) for h in store.history()] == [
        ("pneumonia", None, "dr a"),
        ("normal", "pneumonia", "dr b"),
    ]
    assert store.study_labels(["1.2.3", "9.9"]) == {"1.2.3": "normal"}


def test_labeled_instances_follow_the_analysis_and_the_spool(state: NodeState, tmp_path: Path) -> None:
    store = LabelStore(state.db, CLASSES)
    files = {n: _spool_file(tmp_path, f"{n}.dcm") for n in ("a1", "a2", "b1", "c1")}
    _receive(state, "1.1", "1.1.9.1", files["a1"])
    _receive(state, "1.1", "1.1.9.2", files["a2"])  # not analysed (say, another series)
    _receive(state, "1.2", "1.2.9.1", files["b1"])
    _analyse(state, ["1.1.9.1"])
    _analyse(state, ["1.2.9.1"])
    _receive(state, "1.3", "1.3.9.1", files["c1"])  # never analysed
    store.set_labels(
        [
            LabelInput("study", "1.1", "pneumonia"),
            LabelInput("study", "1.2", "pneumonia"),
            LabelInput("instance", "1.2.9.1", "normal"),  # wins over its study's label
            LabelInput("study", "1.3", "normal"),
        ],
        source="import",
        who="t",
    )
    got = [
        (li.sop_instance_uid, li.study_instance_uid, li.label, li.source) for li in store.labeled_instances()
    ]
    assert got == [("1.1.9.1", "1.1", "pneumonia", "import"), ("1.2.9.1", "1.2", "normal", "import")]
    assert store.labeled_instances()[0].path == files["a1"]
    files["a1"].unlink()  # purged: no longer something to learn from
    assert [li.sop_instance_uid for li in store.labeled_instances()] == ["1.2.9.1"]


def test_an_older_database_gains_the_label_tables(tmp_path: Path) -> None:
    path = tmp_path / "edge.sqlite3"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE labels")
    conn.execute("DROP TABLE label_history")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    db = Database(path)
    assert db.query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"] == str(SCHEMA_VERSION)
    assert LabelStore(db, CLASSES).labels() == []
    db.close()
