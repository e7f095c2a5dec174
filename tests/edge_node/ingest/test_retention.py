"""Spool retention: finished studies leave by age or for room, oldest first; unfinished ones stay."""

from __future__ import annotations

import fcntl
import os
import threading
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from edge_node.ingest.retention import RetentionPolicy, purge_spool
from edge_node.ingest.spool import Spool
from edge_node.state.labels import LabelInput, LabelStore
from edge_node.state.node_state import NodeState
from tests.edge_node.conftest import dicom_dir

DAY = 86400.0


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(
        tmp_path / "spool",
        NodeState.open(tmp_path / "edge.sqlite3").ingest,
        max_instance_bytes=10**8,
        min_free_bytes=0,
    )


def _study(spool: Spool, n: int, *, state: str, at: float) -> tuple[int, list[Path]]:
    """``n`` real CT instances of a new study, spooled, then dated ``at`` and set to ``state``."""
    ds = pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "CT_small.dcm")
    ds.StudyInstanceUID = generate_uid()
    paths = []
    study_id = 0
    for _ in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        receipt = spool.put(buf.getvalue(), calling_ae="PACS")
        study_id = receipt.study_id
        paths.append(receipt.path)
    with spool.records.db.tx() as c:
        c.execute("UPDATE studies SET state = ?, last_instance_at = ? WHERE id = ?", (state, at, study_id))
    return study_id, paths


def _instances(spool: Spool, study_id: int) -> int:
    return int(
        spool.records.db.query("SELECT COUNT(*) AS n FROM instances WHERE study_id = ?", (study_id,))[0]["n"]
    )


def test_old_finished_studies_go_and_unfinished_ones_stay(spool: Spool) -> None:
    now = 100 * DAY
    old_done, old_done_paths = _study(spool, 3, state="done", at=now - 40 * DAY)
    old_failed, _ = _study(spool, 1, state="failed", at=now - 31 * DAY)
    old_waiting, old_waiting_paths = _study(spool, 2, state="received", at=now - 90 * DAY)
    old_running, _ = _study(spool, 2, state="processing", at=now - 90 * DAY)
    young_done, _ = _study(spool, 2, state="done", at=now - 1 * DAY)
    policy = RetentionPolicy(max_age_days=30, max_bytes=None)

    dry = purge_spool(spool, policy, dry_run=True, now=now)
    assert (dry.studies, dry.instances, dry.dry_run) == (2, 4, True)
    assert all(p.exists() for p in old_done_paths)  # a dry run removes nothing

    report = purge_spool(spool, policy, now=now)
    assert (report.studies, report.instances, report.bytes) == (2, 4, dry.bytes)
    assert not any(p.exists() for p in old_done_paths)
    assert not old_done_paths[0].parent.exists()  # the empty study directory went too
    assert all(p.exists() for p in old_waiting_paths)
    counts = {s: _instances(spool, s) for s in (old_done, old_failed, old_waiting, old_running, young_done)}
    assert counts == {old_done: 0, old_failed: 0, old_waiting: 2, old_running: 2, young_done: 2}
    # The study rows stay: status still shows what happened to them.
    assert spool.records.db.query("SELECT state FROM studies WHERE id = ?", (old_done,))[0]["state"] == "done"
    assert purge_spool(spool, policy, now=now).instances == 0


def test_a_spool_over_its_size_drops_the_oldest_finished_studies_first(spool: Spool) -> None:
    now = 100 * DAY
    first, _ = _study(spool, 2, state="done", at=now - 3 * DAY)
    waiting, _ = _study(spool, 2, state="queued", at=now - 5 * DAY)
    second, _ = _study(spool, 2, state="skipped", at=now - 2 * DAY)
    third, _ = _study(spool, 2, state="done", at=now - 1 * DAY)
    size = int(spool.records.db.query("SELECT MAX(size) AS n FROM instances")[0]["n"])
    # Room for 5 instances: the two oldest finished studies go; the waiting one, older still, stays.
    report = purge_spool(spool, RetentionPolicy(max_age_days=None, max_bytes=5 * size), now=now)
    assert report.studies == 2 and report.bytes_left <= 5 * size
    counts = {s: _instances(spool, s) for s in (first, waiting, second, third)}
    assert counts == {first: 0, waiting: 2, second: 0, third: 2}
    # Nothing finished is left to drop: the spool may stay over the limit rather than lose a waiting study.
    report = purge_spool(spool, RetentionPolicy(max_age_days=None, max_bytes=0), now=now)
    assert report.studies == 1 and _instances(spool, waiting) == 2


def test_a_purge_waits_for_an_instance_being_written(spool: Spool) -> None:
    done, _ = _study(spool, 1, state="done", at=0.0)
    lock = os.open(spool.root / ".write.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_SH)  # what a put in progress holds
    finished = threading.Event()

    def purge() -> None:
        purge_spool(spool, RetentionPolicy(1, None), now=10 * DAY)
        finished.set()

    thread = threading.Thread(target=purge)
    thread.start()
    assert not finished.wait(0.5)
    os.close(lock)
    thread.join(10)
    assert finished.is_set() and _instances(spool, done) == 0


def _label(spool: Spool, study_id: int, *, at: float, on_instance: bool = False) -> None:
    db = spool.records.db
    if on_instance:
        sop = db.query("SELECT sop_instance_uid FROM instances WHERE study_id = ? LIMIT 1", (study_id,))[0][0]
        LabelStore(db, ["normal", "abnormal"]).set_labels(
            [LabelInput("instance", str(sop), "abnormal")], source="import", who="test", now=at
        )
    else:
        uid = db.query("SELECT study_uid FROM studies WHERE id = ?", (study_id,))[0][0]
        LabelStore(db, ["normal", "abnormal"]).set_labels(
            [LabelInput("study", str(uid), "normal")], source="page", who="test", now=at
        )


def test_labeled_studies_stay_for_learning_until_their_labels_are_old(spool: Spool) -> None:
    now = 1000 * DAY
    plain, _ = _study(spool, 1, state="done", at=now - 40 * DAY)
    by_study, by_study_paths = _study(spool, 2, state="done", at=now - 40 * DAY)
    by_instance, _ = _study(spool, 2, state="skipped", at=now - 40 * DAY)
    stale, _ = _study(spool, 1, state="done", at=now - 500 * DAY)
    waiting, _ = _study(spool, 1, state="queued", at=now - 500 * DAY)
    _label(spool, by_study, at=now - 10 * DAY)
    _label(spool, by_instance, at=now - 100 * DAY, on_instance=True)
    _label(spool, stale, at=now - 400 * DAY)
    # Age and size both say "drop everything finished"; labels younger than a year keep their studies.
    policy = RetentionPolicy(max_age_days=30, max_bytes=0, labeled_keep_days=365)
    report = purge_spool(spool, policy, now=now)
    counts = {s: _instances(spool, s) for s in (plain, by_study, by_instance, stale, waiting)}
    assert counts == {plain: 0, by_study: 2, by_instance: 2, stale: 0, waiting: 1}
    assert report.studies == 2 and all(p.exists() for p in by_study_paths)
    # None keeps labeled studies as long as they are labeled; 0 lets labels protect nothing.
    assert (
        purge_spool(spool, RetentionPolicy(30, 0, labeled_keep_days=None), now=now + 9000 * DAY).studies == 0
    )
    assert purge_spool(spool, RetentionPolicy(30, 0, labeled_keep_days=0), now=now).studies == 2
    assert _instances(spool, waiting) == 1  # never a study still waiting for analysis
