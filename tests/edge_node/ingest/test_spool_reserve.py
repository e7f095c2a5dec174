"""The spool's reserve: slots written through with zeros in idle time, used first, cut to the instance's
length, and recovered after a crash at any step (``edge_node.ingest.slot_pool``)."""

from __future__ import annotations

import copy
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from edge_node.errors import SpoolError
from edge_node.ingest.spool import IncomingInstance, Spool, SpoolReserve, _complete_length, _marked
from edge_node.state.node_state import NodeState
from edge_node.state.status_queries import StatusQueries
from tests.edge_node.conftest import dicom_dir, until

SLOT = 256 * 1024
SLOTS = 3


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _open(root: Path, db: Path, *, min_free: int = 0, slots: int = SLOTS, pool: str | None = None) -> Spool:
    return Spool(
        root,
        NodeState.open(db).ingest,
        max_instance_bytes=10**8,
        min_free_bytes=min_free,
        pool_name=pool,
        reserve=SpoolReserve(slots=slots, slot_bytes=SLOT, idle_s=0.05),
    )


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = _open(tmp_path / "spool", tmp_path / "edge.sqlite3")
    yield spool
    spool.stop_reserve()


@pytest.fixture
def ct() -> pydicom.Dataset:
    return pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "CT_small.dcm")


def _primed(spool: Spool) -> list[Path]:
    """Reserve slots on disk: ``SLOT`` bytes, nothing but zeros."""
    return [
        p
        for p in spool.pool_dir.glob("*.slot")
        if p.stat().st_size == SLOT and not p.read_bytes().strip(b"\0")
    ]


def _data_set(ds: pydicom.Dataset) -> bytes:
    """What a sender puts in its P-DATA fragments: the stream after the file meta."""
    raw = _bytes(ds)
    return raw[pydicom.dcmread(BytesIO(raw)).file_meta["FileMetaInformationGroupLength"].value + 144 :]


def _exactly(path: Path, ds: pydicom.Dataset) -> None:
    """The spool file holds the data set as received and ends where its mark says: no zeros after it."""
    stored = path.read_bytes()
    assert stored.endswith(_data_set(ds)) and _complete_length(stored) == len(stored)
    assert pydicom.dcmread(path).PixelData == ds.PixelData


def _receive(spool: Spool, ds: pydicom.Dataset) -> IncomingInstance:
    data_set = _data_set(ds)
    incoming = spool.receive(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    for start in range(0, len(data_set), 16384):
        incoming.append(memoryview(data_set)[start : start + 16384])
    return incoming


def _flush(incoming: IncomingInstance, ds: pydicom.Dataset) -> Path:
    """Commit as the transport does before its response: the instance flushed in its slot (returned)."""
    slot = incoming._slot
    incoming.commit(
        calling_ae="TESTSCU",
        expected_sop_class=str(ds.SOPClassUID),
        expected_sop_instance=str(ds.SOPInstanceUID),
    )
    assert slot is not None
    return slot


def _commit(incoming: IncomingInstance, ds: pydicom.Dataset) -> Path:
    """Commit as the transport does: the response would go here, then ``settle``; the placed file."""
    slot = _flush(incoming, ds)
    if slot.stat().st_size == SLOT:  # a reserve slot: flushed with its zeros, cut after settle
        length = _complete_length(slot.read_bytes())
        assert length is not None and length < slot.stat().st_size
    receipt = incoming.settle()
    assert receipt is not None and not slot.exists()
    incoming._spool.settled()
    return receipt.path


def test_the_reserve_is_made_in_idle_time_and_used_first(spool: Spool, ct: pydicom.Dataset) -> None:
    assert spool.reserve_ready == 0
    spool.start_reserve()
    assert until(lambda: spool.reserve_ready == SLOTS)
    assert len(_primed(spool)) == SLOTS
    # Received (fragments) and put (a whole stream): each into a reserve slot, cut to its own length.
    for how in ("received", "put"):
        ct.SOPInstanceUID = generate_uid()
        before = set(_primed(spool))
        if how == "received":
            path = _commit(_receive(spool, ct), ct)
        else:
            path = spool.put(_bytes(ct), calling_ae="A").path
        used = before - set(_primed(spool))
        assert len(used) == 1 and not next(iter(used)).exists()  # that slot became the instance
        _exactly(path, ct)
        assert path.stat().st_size < SLOT
    # Made again at the next pause.
    assert until(lambda: spool.reserve_ready == SLOTS)
    assert StatusQueries(spool.records.db).counts()["instances"] == 2


def test_an_instance_larger_than_its_slot_grows_it(spool: Spool) -> None:
    big = pydicom.dcmread(next(iter(sorted((dicom_dir() / "tcia_covid19_ny_sbu").rglob("*.dcm")))))
    assert len(_bytes(big)) > SLOT
    spool.start_reserve()
    assert until(lambda: spool.reserve_ready == SLOTS)
    big.SOPInstanceUID = generate_uid()
    path = _commit(_receive(spool, big), big)
    _exactly(path, big)


def test_nothing_is_primed_while_an_instance_is_received(spool: Spool, ct: pydicom.Dataset) -> None:
    incoming = _receive(spool, ct)  # in progress: its slot is taken, the spool is not idle
    spool.start_reserve()
    time.sleep(0.5)
    assert spool.reserve_ready == 0 and not _primed(spool)
    _commit(incoming, ct)
    assert until(lambda: spool.reserve_ready == SLOTS)


def test_no_reserve_on_a_disk_short_of_room(tmp_path: Path) -> None:
    spool = _open(tmp_path / "spool", tmp_path / "edge.sqlite3", min_free=2**62)
    spool.start_reserve()
    time.sleep(0.5)
    spool.stop_reserve()
    assert spool.reserve_ready == 0 and not _primed(spool)


def test_recovery_after_a_crash_at_each_step_with_reserve_slots(tmp_path: Path, ct: pydicom.Dataset) -> None:
    root, db = tmp_path / "spool", tmp_path / "edge.sqlite3"
    spool = _open(root, db)
    spool.start_reserve()
    assert until(lambda: spool.reserve_ready == SLOTS)
    spool.stop_reserve()
    first, second, third = _primed(spool)
    # 1. Flushed, then the power went before the cut and the rename: the slot holds the stream, then zeros.
    ct.SOPInstanceUID = generate_uid()
    raw = _bytes(ct)
    with first.open("r+b") as f:
        f.write(_marked(raw) + raw[128:])
    # 2. Cut short while it arrived (no mark yet): never acknowledged.
    with second.open("r+b") as f:
        f.write(bytes(128) + raw[128:4000])
    # 3. Renamed into place without its cut (a file system that does not keep metadata changes in order),
    #    and its row lost: indexed again, cut to the length its mark states.
    other = copy.deepcopy(ct)
    other.SOPInstanceUID = generate_uid()
    other_raw = _bytes(other)
    placed = spool.path_for(str(other.StudyInstanceUID), str(other.SOPInstanceUID))
    placed.parent.mkdir(parents=True, exist_ok=True)
    placed.write_bytes(_marked(other_raw) + other_raw[128:] + bytes(SLOT - len(other_raw)))

    again = _open(root, db)
    assert again.recover() == (1, 2)
    for ds, stream in ((ct, raw), (other, other_raw)):
        path = again.path_for(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        assert path.read_bytes()[128:] == stream[128:]  # exactly the stream: the zeros were cut
        assert pydicom.dcmread(path).PixelData == ds.PixelData
    assert not first.exists() and not second.exists()
    # The unused reserve slot is handed out as one: no zeros written again for it.
    assert third.exists() and again.reserve_ready == 1
    assert StatusQueries(again.records.db).counts()["instances"] == 2


def test_a_crash_after_the_response_before_settle_loses_nothing(tmp_path: Path, ct: pydicom.Dataset) -> None:
    root, db = tmp_path / "spool", tmp_path / "edge.sqlite3"
    spool = _open(root, db)
    spool.start_reserve()
    assert until(lambda: spool.reserve_ready == SLOTS)
    incoming = _receive(spool, ct)
    slot = _flush(incoming, ct)
    spool.stop_reserve()
    # Acknowledged, then killed before ``settle``: flushed in its reserve slot with the zeros after it,
    # neither placed nor recorded. The next start places it, cuts it and indexes it.
    assert slot.stat().st_size == SLOT
    os.close(incoming._fd)
    again = _open(root, db)
    assert again.recover() == (0, 1)
    path = again.path_for(str(ct.StudyInstanceUID), str(ct.SOPInstanceUID))
    _exactly(path, ct)
    assert not slot.exists() and StatusQueries(again.records.db).counts()["instances"] == 1


def test_a_crash_before_the_cut_is_cut_at_the_next_start(
    tmp_path: Path, ct: pydicom.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, db = tmp_path / "spool", tmp_path / "edge.sqlite3"
    spool = _open(root, db)
    spool.start_reserve()
    assert until(lambda: spool.reserve_ready == SLOTS)
    spool.stop_reserve()
    monkeypatch.setattr(spool._cutter, "cut", lambda fd, size: os.close(fd))  # killed before the cut
    incoming = _receive(spool, ct)
    _flush(incoming, ct)
    receipt = incoming.settle()
    # In place and recorded, with the reserve's zeros after it.
    assert receipt is not None and receipt.path.stat().st_size == SLOT > receipt.size
    again = _open(root, db)
    assert again.recover() == (0, 0)
    assert receipt.path.stat().st_size == receipt.size
    _exactly(receipt.path, ct)


def test_an_instance_that_cannot_be_recorded_after_its_response_waits_for_recovery(
    tmp_path: Path, ct: pydicom.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, db = tmp_path / "spool", tmp_path / "edge.sqlite3"
    spool = _open(root, db)

    def no_room(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(spool, "_record", no_room)
    incoming = _receive(spool, ct)
    _flush(incoming, ct)
    with pytest.raises(SpoolError, match=r"could not be recorded and placed \(database or disk is full\)"):
        incoming.settle()
    assert StatusQueries(spool.records.db).counts()["instances"] == 0
    os.close(incoming._fd)  # killed now: still in its slot, without its row
    again = _open(root, db)
    assert again.recover() == (0, 1)
    _exactly(again.path_for(str(ct.StudyInstanceUID), str(ct.SOPInstanceUID)), ct)


def _revisions(spool: Spool) -> list[int]:
    return [r["revision"] for r in spool.records.db.query("SELECT revision FROM studies")]


def test_a_receiver_killed_between_the_row_and_the_rename_leaves_it_to_the_next_one(
    tmp_path: Path, ct: pydicom.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, db = tmp_path / "spool", tmp_path / "edge.sqlite3"
    spool = _open(root, db, pool="r0")

    def cut_off(slot: Path, dest: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool, "_place", cut_off)
    incoming = _receive(spool, ct)
    slot = _flush(incoming, ct)
    with pytest.raises(SpoolError, match="could not be recorded and placed"):
        incoming.settle()
    # Recorded, still in the receiver's own pool: where the receiver started in its place looks.
    assert slot.exists() and _revisions(spool) == [1]
    os.close(incoming._fd)  # killed now
    again = _open(root, db, pool="r0")
    assert again.recover_own_slots() == (0, 0)  # placed, not recorded a second time
    _exactly(again.path_for(str(ct.StudyInstanceUID), str(ct.SOPInstanceUID)), ct)
    assert not slot.exists() and _revisions(again) == [1]


def test_a_rename_that_failed_is_tried_again_without_a_second_row(
    spool: Spool, ct: pydicom.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    place = spool._place

    def fails_once(slot: Path, dest: Path) -> None:
        monkeypatch.setattr(spool, "_place", place)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "_place", fails_once)
    incoming = _receive(spool, ct)
    _flush(incoming, ct)
    with pytest.raises(SpoolError, match="No space left on device"):
        incoming.settle()
    receipt = incoming.settle()
    assert receipt is not None
    _exactly(receipt.path, ct)
    assert _revisions(spool) == [1] and StatusQueries(spool.records.db).counts()["instances"] == 1


def test_the_last_instance_placed_wins_and_each_cut_keeps_to_its_own_file(
    spool: Spool, ct: pydicom.Dataset
) -> None:
    spool.start_reserve()
    assert until(lambda: spool.reserve_ready == SLOTS)
    original = copy.deepcopy(ct)
    first = _receive(spool, ct)
    _flush(first, ct)
    # The same instance again, longer, from another association, placed before the first one.
    ct.ImageComments = "x" * 5000
    path = _commit(_receive(spool, ct), ct)
    _exactly(path, ct)
    receipt = first.settle()
    spool.settled()
    # The first one's settle came last: its stream replaced the second's, and its cut did not shorten it.
    assert receipt is not None and receipt.path == path
    _exactly(path, original)
    rows = spool.records.db.query("SELECT size FROM instances")
    assert [r["size"] for r in rows] == [path.stat().st_size]


def test_a_slot_that_could_not_be_made_keeps_nothing_busy(spool: Spool, ct: pydicom.Dataset) -> None:
    shutil.rmtree(spool.pool_dir)  # the next refill fails
    with pytest.raises(SpoolError):
        spool.put(_bytes(ct), calling_ae="A")
    spool.pool_dir.mkdir()
    spool.start_reserve()  # nothing is in progress: the reserve is made
    assert until(lambda: spool.reserve_ready == SLOTS)
