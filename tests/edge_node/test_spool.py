"""The spool: durable writes, header checks, refusals, and recovery of what a crash leaves behind."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from edge_node.errors import BadInstanceError, InstanceMismatchError, SpoolFullError
from edge_node.spool import Spool, parse_header
from edge_node.store import Store
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
        tmp_path / "spool", Store(tmp_path / "edge.sqlite3"), max_instance_bytes=10**8, min_free_bytes=0
    )


def test_put_writes_the_bytes_as_received_and_records_them(spool: Spool, ct: pydicom.Dataset) -> None:
    raw = _bytes(ct)
    receipt = spool.put(raw, calling_ae="TESTSCU", expected_sop_instance=str(ct.SOPInstanceUID))
    assert receipt.path.read_bytes() == raw
    assert receipt.path.is_relative_to(spool.root)
    assert str(ct.StudyInstanceUID) not in str(receipt.path)  # file names carry hashes, not UIDs
    assert spool.store.counts()["instances"] == 1
    assert not list((spool.root / ".tmp").iterdir())


def test_resend_overwrites_the_same_file(spool: Spool, ct: pydicom.Dataset) -> None:
    first = spool.put(_bytes(ct), calling_ae="A")
    ct.InstanceNumber = 99
    second = spool.put(_bytes(ct), calling_ae="A")
    assert first.path == second.path
    assert pydicom.dcmread(second.path).InstanceNumber == 99
    assert spool.store.counts()["instances"] == 1


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
    store = Store(tmp_path / "edge.sqlite3")
    small = Spool(tmp_path / "s1", store, max_instance_bytes=1024, min_free_bytes=0)
    with pytest.raises(SpoolFullError, match="max_instance_bytes"):
        small.put(_bytes(ct), calling_ae="A")
    full = Spool(tmp_path / "s2", store, max_instance_bytes=10**8, min_free_bytes=2**62)
    with pytest.raises(SpoolFullError, match="free"):
        full.put(_bytes(ct), calling_ae="A")
    assert store.counts()["instances"] == 0


def test_recover_removes_partial_writes_and_indexes_complete_files(spool: Spool, ct: pydicom.Dataset) -> None:
    kept = spool.put(_bytes(ct), calling_ae="A")
    (spool.root / ".tmp" / "x.part").write_bytes(b"half")
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
    assert spool.store.counts()["instances"] == 2
    assert spool.store.recent_studies()[0].state == "received"
