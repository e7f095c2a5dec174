"""The spool: durable writes, header checks, refusals, and recovery of what a crash leaves behind."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from edge_node.errors import BadInstanceError, InstanceMismatchError, SpoolFullError
from edge_node.ingest.part10 import _read_header, _scan_header, _Unscannable, file_meta, parse_header
from edge_node.ingest.spool import POOL_BATCH, IncomingInstance, Spool, _is_complete, _marked
from edge_node.state.node_state import NodeState
from edge_node.state.status_queries import StatusQueries
from tests.edge_node.conftest import dicom_dir


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def ct() -> pydicom.Dataset:
    return pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "CT_small.dcm")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(
        tmp_path / "spool",
        NodeState.open(tmp_path / "edge.sqlite3").ingest,
        max_instance_bytes=10**8,
        min_free_bytes=0,
    )


def test_put_writes_the_bytes_as_received_and_records_them(spool: Spool, ct: pydicom.Dataset) -> None:
    raw = _bytes(ct)
    receipt = spool.put(raw, calling_ae="TESTSCU", expected_sop_instance=str(ct.SOPInstanceUID))
    spooled = receipt.path.read_bytes()
    # Everything after the 128-byte preamble is the stream as received; the preamble is the spool's mark.
    assert spooled[128:] == raw[128:] and spooled.startswith(b"FEDCLINIC-SPOOL1")
    assert pydicom.dcmread(receipt.path).PixelData == ct.PixelData
    assert receipt.path.is_relative_to(spool.root)
    assert str(ct.StudyInstanceUID) not in str(receipt.path)  # file names carry hashes, not UIDs
    assert StatusQueries(spool.records.db).counts()["instances"] == 1
    # The slot it was written in was renamed into place; what is left in the pool is empty and ready.
    left = list(spool.pool_dir.iterdir())
    assert len(left) == POOL_BATCH - 1 and all(p.stat().st_size == 0 for p in left)


def test_pool_refills_in_batches(spool: Spool, ct: pydicom.Dataset) -> None:
    for _ in range(POOL_BATCH + 1):
        ct.SOPInstanceUID = generate_uid()
        spool.put(_bytes(ct), calling_ae="A")
    assert len(list(spool.pool_dir.iterdir())) == POOL_BATCH - 1
    assert StatusQueries(spool.records.db).counts()["instances"] == POOL_BATCH + 1


def test_resend_overwrites_the_same_file(spool: Spool, ct: pydicom.Dataset) -> None:
    first = spool.put(_bytes(ct), calling_ae="A")
    ct.InstanceNumber = 99
    second = spool.put(_bytes(ct), calling_ae="A")
    assert first.path == second.path
    assert pydicom.dcmread(second.path).InstanceNumber == 99
    assert StatusQueries(spool.records.db).counts()["instances"] == 1


def test_every_real_sample_parses_or_is_refused(tmp_path: Path) -> None:
    parsed = refused = 0
    for path in sorted(dicom_dir().rglob("*")):
        if not path.is_file():
            continue
        try:
            header = parse_header(path.read_bytes())
        except BadInstanceError:
            refused += 1
            continue
        assert header.study_uid and header.sop_instance_uid and header.transfer_syntax
        parsed += 1
    assert parsed >= 80  # the DICOMDIR-style files without instance UIDs are the only refusals
    assert refused <= 8


def test_fast_header_scan_agrees_with_pydicom_on_every_real_sample() -> None:
    scanned = 0
    for path in sorted(dicom_dir().rglob("*")):
        if not path.is_file():
            continue
        stream = path.read_bytes()
        try:
            fast = _scan_header(stream)
        except (_Unscannable, BadInstanceError):
            continue  # parse_header falls back to pydicom for these
        assert fast == _read_header(stream), path.name
        scanned += 1
    assert scanned >= 70  # the fast path covers the usual little endian files, sequences and all


def test_truncated_data_and_missing_uids_are_bad_instances(ct: pydicom.Dataset) -> None:
    raw = _bytes(ct)
    with pytest.raises(BadInstanceError, match="cannot be parsed"):
        parse_header(raw[:200])  # cut inside the file meta
    with pytest.raises(BadInstanceError, match="SOPClassUID"):
        parse_header(raw[:400])  # cut before the identifying attributes
    del ct.StudyInstanceUID
    with pytest.raises(BadInstanceError, match="StudyInstanceUID"):
        parse_header(_bytes(ct))


def test_request_mismatch_is_refused(spool: Spool, ct: pydicom.Dataset) -> None:
    with pytest.raises(InstanceMismatchError):
        spool.put(_bytes(ct), calling_ae="A", expected_sop_instance=generate_uid())
    with pytest.raises(InstanceMismatchError):
        spool.put(_bytes(ct), calling_ae="A", expected_sop_class="1.2.840.10008.5.1.4.1.1.4")


def test_too_large_or_no_room_is_out_of_resources(tmp_path: Path, ct: pydicom.Dataset) -> None:
    store = NodeState.open(tmp_path / "edge.sqlite3")
    small = Spool(tmp_path / "s1", store.ingest, max_instance_bytes=1024, min_free_bytes=0)
    with pytest.raises(SpoolFullError, match="max_instance_bytes"):
        small.put(_bytes(ct), calling_ae="A")
    full = Spool(tmp_path / "s2", store.ingest, max_instance_bytes=10**8, min_free_bytes=2**62)
    with pytest.raises(SpoolFullError, match="free"):
        full.put(_bytes(ct), calling_ae="A")
    assert store.status.counts()["instances"] == 0


def test_recover_removes_partial_writes_and_indexes_complete_files(spool: Spool, ct: pydicom.Dataset) -> None:
    kept = spool.put(_bytes(ct), calling_ae="A")
    (spool.pool_dir / "cut.slot").write_bytes(b"half")  # a write cut short by the crash: never acknowledged
    # A complete file whose row was lost (power cut after the rename): indexed again, not thrown away.
    ct.SOPInstanceUID = generate_uid()
    lost = spool.path_for(str(ct.StudyInstanceUID), str(ct.SOPInstanceUID))
    lost.write_bytes(_bytes(ct))
    # Junk that is not an instance of ours: removed.
    junk_dir = spool.root / "deadbeef"
    junk_dir.mkdir()
    (junk_dir / "cafe.dcm").write_bytes(b"not dicom")
    assert spool.recover() == (1, 1)
    assert kept.path.is_file() and lost.is_file()
    assert not junk_dir.exists()
    assert StatusQueries(spool.records.db).counts()["instances"] == 2
    assert StatusQueries(spool.records.db).recent_studies()[0].state == "received"


def _crash_after_fsync(spool: Spool, stream: bytes) -> Path:
    """What a power cut between a slot's fsync and its (not yet durable) rename leaves: a filled slot."""
    dest = spool.path_for("1.2.3", "4.5.6")  # any destination: the slot's rename is undone below
    spool._write_durably(dest, stream)
    slot = spool.pool_dir / "crashed.slot"
    dest.rename(slot)
    dest.parent.rmdir()
    return slot


def test_recover_moves_complete_slots_into_place_and_drops_partial_ones(
    spool: Spool, ct: pydicom.Dataset
) -> None:
    raw = _bytes(ct)
    slot = _crash_after_fsync(spool, raw)
    empty_before = sorted(p for p in spool.pool_dir.iterdir() if p.stat().st_size == 0)
    assert spool.recover() == (0, 1)
    spooled = spool.path_for(str(ct.StudyInstanceUID), str(ct.SOPInstanceUID))
    assert not slot.exists() and spooled.read_bytes()[128:] == raw[128:]
    assert spool.records.spool_paths() == {spooled}
    # The empty slots found at start are handed out again: no new batch is made for the next instance.
    ct.SOPInstanceUID = generate_uid()
    spool.put(_bytes(ct), calling_ae="A")
    assert len(list(spool.pool_dir.iterdir())) == len(empty_before) - 1

    # Cut short (a kill during the write), or damaged (a power cut that wrote the blocks out of order):
    # never acknowledged, removed, and nothing indexed.
    for damage in ("truncate", "flip"):
        ct.SOPInstanceUID = generate_uid()
        slot = _crash_after_fsync(spool, _bytes(ct))
        data = bytearray(slot.read_bytes())
        if damage == "truncate":
            del data[-1000:]
        else:
            data[len(data) // 2] ^= 0xFF
        slot.write_bytes(bytes(data))
        assert spool.recover() == (1, 0)
        assert not slot.exists()
    assert StatusQueries(spool.records.db).counts()["instances"] == 2


def test_recover_moves_a_slot_whose_row_survived_without_a_new_revision(
    spool: Spool, ct: pydicom.Dataset
) -> None:
    raw = _bytes(ct)
    receipt = spool.put(raw, calling_ae="A")
    # A power cut kept the row but lost the rename: the instance is back under a slot name.
    slot = spool.pool_dir / "renamed-back.slot"
    receipt.path.rename(slot)
    assert spool.recover() == (0, 0)
    assert receipt.path.read_bytes()[128:] == raw[128:] and not slot.exists()
    rows = spool.records.db.query("SELECT revision FROM instances")
    assert [r[0] for r in rows] == [1]


def _data_set(raw: bytes) -> bytes:
    """The data set of a Part 10 stream: what a sender puts in its P-DATA fragments."""
    ds = pydicom.dcmread(BytesIO(raw))
    return raw[ds.file_meta["FileMetaInformationGroupLength"].value + 144 :]


def _receive(spool: Spool, ct: pydicom.Dataset, raw: bytes, fragment: int = 1000) -> IncomingInstance:
    incoming = spool.receive(str(ct.SOPClassUID), str(ct.SOPInstanceUID), str(ct.file_meta.TransferSyntaxUID))
    data = memoryview(_data_set(raw))
    for start in range(0, len(data), fragment):
        incoming.append(data[start : start + fragment])
    return incoming


def test_a_received_instance_is_written_as_it_arrives_and_equals_put(
    spool: Spool, ct: pydicom.Dataset
) -> None:
    ct.SOPInstanceUID = generate_uid()
    raw = _bytes(ct)
    incoming = _receive(spool, ct, raw)
    incoming.commit(
        calling_ae="TESTSCU",
        expected_sop_class=str(ct.SOPClassUID),
        expected_sop_instance=str(ct.SOPInstanceUID),
    )
    # Flushed under its slot's name, not yet placed or recorded: what the sender's response waits for.
    assert StatusQueries(spool.records.db).counts()["instances"] == 0
    receipt = incoming.settle()
    assert receipt is not None and incoming.settle() is None
    spooled = receipt.path.read_bytes()
    # The same mark (magic, length, CRC) as a whole-stream put of the same bytes: recovery proves both.
    stream = bytes(128) + file_meta(
        str(ct.SOPClassUID), str(ct.SOPInstanceUID), str(ct.file_meta.TransferSyntaxUID)
    )
    stream += _data_set(raw)
    assert spooled[:128] == _marked(stream) and spooled[128:] == stream[128:]
    assert _is_complete(spooled)
    assert pydicom.dcmread(receipt.path).PixelData == ct.PixelData
    assert StatusQueries(spool.records.db).counts()["instances"] == 1
    assert len(list(spool.pool_dir.iterdir())) == POOL_BATCH - 1


def test_a_received_instance_over_the_budget_stops_being_written(tmp_path: Path, ct: pydicom.Dataset) -> None:
    store = NodeState.open(tmp_path / "edge.sqlite3")
    spool = Spool(tmp_path / "spool", store.ingest, max_instance_bytes=4096, min_free_bytes=0)
    incoming = _receive(spool, ct, _bytes(ct))
    assert incoming.size > 4096
    # Given back emptied at the first fragment over the budget: nothing more was written.
    assert all(p.stat().st_size == 0 for p in spool.pool_dir.iterdir())
    with pytest.raises(SpoolFullError, match="max_instance_bytes"):
        incoming.commit(calling_ae="A", expected_sop_class=str(ct.SOPClassUID), expected_sop_instance="1.2")
    assert StatusQueries(store.db).counts()["instances"] == 0
    assert len(list(spool.pool_dir.iterdir())) == POOL_BATCH


def test_a_received_instance_that_does_not_match_or_parse_is_dropped(
    spool: Spool, ct: pydicom.Dataset
) -> None:
    raw = _bytes(ct)
    with pytest.raises(InstanceMismatchError):
        _receive(spool, ct, raw).commit(
            calling_ae="A", expected_sop_class=str(ct.SOPClassUID), expected_sop_instance="1.2.3"
        )
    garbage = spool.receive(str(ct.SOPClassUID), "1.2.3", str(ct.file_meta.TransferSyntaxUID))
    garbage.append(memoryview(b"\x08\x00\x18\x00UI\xff\xff" + bytes(64)))
    with pytest.raises(BadInstanceError):
        garbage.commit(calling_ae="A", expected_sop_class=str(ct.SOPClassUID), expected_sop_instance="1.2.3")
    assert StatusQueries(spool.records.db).counts()["instances"] == 0
    assert all(p.stat().st_size == 0 for p in spool.pool_dir.iterdir())


def test_a_transfer_cut_short_leaves_a_slot_recovery_removes(spool: Spool, ct: pydicom.Dataset) -> None:
    raw = _bytes(ct)
    incoming = spool.receive(str(ct.SOPClassUID), str(ct.SOPInstanceUID), str(ct.file_meta.TransferSyntaxUID))
    incoming.append(memoryview(_data_set(raw))[:5000])
    # A crash now (the process dies, nothing discards it): the slot holds a stream without the spool's mark.
    (written,) = [p for p in spool.pool_dir.iterdir() if p.stat().st_size]
    assert not _is_complete(written.read_bytes())
    assert spool.recover() == (1, 0)
    assert not written.exists()
