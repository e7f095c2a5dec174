"""A real node against memory bombs and a crash loop: refused from the header, bounded memory, set aside."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from tests.edge_node.conftest import (
    EdgeProcess,
    TrustedBundle,
    acknowledged_files,
    dicom_dir,
    echoscu,
    make_ct_instances,
    peak_rss,
    propose_flag,
    storescu,
)

pytestmark = pytest.mark.slow

#: The stated bound: the node's peak resident memory (VmHWM, its receiver processes' added) while it refuses
#: the bombs below. A node that
#: decoded the 8192² bomb would pass 1.5 GB (float64 copies of 67 M pixels).
RSS_BUDGET_BYTES = 700 * 1024 * 1024
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX = dicom_dir() / "highdicom" / "dx_image.dcm"


def _rle_bomb(path: Path, side: int) -> None:
    """An RLE Lossless CR of side² 8-bit zeros: ~side²/64 bytes on disk, side² bytes (and more) decoded."""
    run = bytes([0x81, 0x00])  # PackBits: repeat the next byte 128 times
    segment = run * (side * side // 128)
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pydicom.encaps.encapsulate([header + segment])
    ds["PixelData"].VR = "OB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = RLELossless
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def _oversized(path: Path, n_bytes: int) -> None:
    ds = pydicom.dcmread(DX)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.add_new(0x00091010, "LO", "fedclinic-test")  # private creator
    ds.add_new(0x00091000 | 0x1000, "OB", bytes(n_bytes))  # padding in a private element
    ds.save_as(path, enforce_file_format=True)


def _study_state(edge: EdgeProcess) -> dict[str, str]:
    return {str(uid): str(state) for uid, state in edge.query("SELECT study_uid, state FROM studies")}


def test_bombs_are_refused_within_the_memory_budget(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path
) -> None:
    edge = edge_factory(
        trusted_keys=str(test_bundle.public_key), quiet_seconds=0.3, max_instance_bytes=8 * 1024 * 1024
    )
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    edge.start()
    assert edge.proc is not None
    bombs = []
    for side in (8192, 12288):
        bombs.append(tmp_path / f"bomb{side}.dcm")
        _rle_bomb(bombs[-1], side)
        assert bombs[-1].stat().st_size < 3 * 1024 * 1024
    proc = storescu(edge.port, bombs, flags=propose_flag(bombs[0]))
    ok, bad = acknowledged_files(proc.stdout + proc.stderr)
    assert len(ok) == 2, proc.stdout + proc.stderr  # valid DICOM: spooled, then refused by analysis
    big = tmp_path / "big.dcm"
    _oversized(big, 12 * 1024 * 1024)
    proc = storescu(edge.port, [big])
    ok, bad = acknowledged_files(proc.stdout + proc.stderr)
    assert not ok and len(bad) == 1  # over max_instance_bytes: out of resources
    edge.wait_idle(120)
    states = edge.query("SELECT state FROM studies")
    assert [s[0] for s in states] == ["skipped", "skipped"]
    reasons = [r[0] for r in edge.query("SELECT reason FROM runs")]
    assert all("decoding budget" in str(r) for r in reasons), reasons
    peak = peak_rss(edge.proc.pid)
    assert peak < RSS_BUDGET_BYTES, f"peak RSS {peak / 2**20:.0f} MiB"
    # And the node still serves: a normal study gets its result.
    good = make_ct_instances(tmp_path / "good", 1, source=DX)
    assert storescu(edge.port, good).returncode == 0
    edge.wait_idle(120)
    assert "done" in _study_state(edge).values()
    assert edge.stop() == 0


def test_a_study_that_kills_the_node_is_set_aside_and_the_node_serves(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path
) -> None:
    # Quiet time longer than the send: the study is claimed once, when the association is released.
    edge = edge_factory(trusted_keys=str(test_bundle.public_key), quiet_seconds=30.0, max_run_attempts=2)
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    killer = make_ct_instances(tmp_path / "killer", 150, source=DX)
    edge.start()
    assert storescu(edge.port, killer).returncode == 0
    study_uid = str(pydicom.dcmread(killer[0], stop_before_pixels=True).StudyInstanceUID)
    for attempt in range(2):
        # The run "kills the node": kill -9 while the study is being processed.
        deadline = time.time() + 60
        while _study_state(edge).get(study_uid) != "processing":
            assert time.time() < deadline, f"attempt {attempt}: never processing"
            time.sleep(0.02)
        edge.kill9()
        edge.start()
    edge.wait_idle(60)
    assert _study_state(edge)[study_uid] == "failed"
    (reason,) = edge.query("SELECT reason FROM runs ORDER BY id DESC LIMIT 1")
    assert "set aside" in str(reason[0])
    assert echoscu(edge.port)
    good = make_ct_instances(tmp_path / "good", 1, source=DX)
    assert storescu(edge.port, good).returncode == 0
    edge.wait_idle(120)
    good_uid = str(pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID)
    assert _study_state(edge)[good_uid] == "done"
    assert edge.stop() == 0


def test_an_oversized_instance_is_refused_without_being_held_in_memory(
    edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle, tmp_path: Path
) -> None:
    edge = edge_factory(trusted_keys=str(test_bundle.public_key), max_instance_bytes=32 * 1024 * 1024)
    edge.start()
    assert edge.proc is not None
    assert echoscu(edge.port)
    before = peak_rss(edge.proc.pid)
    big = tmp_path / "big.dcm"
    _oversized(big, 200 * 1024 * 1024)
    proc = storescu(edge.port, [big])
    ok, bad = acknowledged_files(proc.stdout + proc.stderr)
    assert not ok and len(bad) == 1, proc.stdout + proc.stderr
    assert "Refused: OutOfResources" in proc.stdout + proc.stderr
    grown = peak_rss(edge.proc.pid) - before
    # Received to a file as it arrived and refused by its size: the 200 MB never sat in memory.
    assert grown < 48 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    assert edge.query("SELECT COUNT(*) FROM instances") == [(0,)]
    assert echoscu(edge.port)
