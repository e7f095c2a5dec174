"""A late instance in a real Orthanc: the node sends a successor SR that names its predecessor."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pydicom
import pytest
from pydicom.uid import generate_uid

from harness.demo.orthanc import Orthanc
from tests.edge_node.conftest import EdgeProcess, TrustedBundle, dicom_dir, make_ct_instances, storescu

pytestmark = pytest.mark.slow

DX = dicom_dir() / "highdicom" / "dx_image.dcm"


def _reports(orthanc: Orthanc) -> dict[str, pydicom.Dataset]:
    """Every SR Orthanc holds, by SOP Instance UID."""
    found: dict[str, pydicom.Dataset] = {}
    for study in orthanc.studies():
        for instance in orthanc.study_instances(study):
            ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])), stop_before_pixels=True)
            if ds.Modality == "SR":
                found[str(ds.SOPInstanceUID)] = ds
    return found


def _wait_reports(orthanc: Orthanc, n: int, timeout: float = 60.0) -> dict[str, pydicom.Dataset]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        reports = _reports(orthanc)
        if len(reports) >= n:
            return reports
        time.sleep(0.2)
    raise AssertionError(f"Orthanc holds {len(_reports(orthanc))} SR(s), expected {n}")


def test_a_late_instance_gives_a_successor_sr_and_a_resend_does_not(
    orthanc: Orthanc,
    edge_factory: Callable[..., EdgeProcess],
    test_bundle: TrustedBundle,
    tmp_path: Path,
) -> None:
    edge = edge_factory(
        trusted_keys=str(test_bundle.public_key),
        quiet_seconds=1.0,
        destinations=[{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
    )
    assert edge.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    edge.start()
    first = make_ct_instances(tmp_path / "first", 2, source=DX)
    assert storescu(edge.port, first).returncode == 0
    edge.wait_idle(90)
    (original,) = _wait_reports(orthanc, 1).values()
    assert "PredecessorDocumentsSequence" not in original

    # A third image of the same study arrives after the result went out.
    late_ds = pydicom.dcmread(first[0])
    late_ds.SOPInstanceUID = late_ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late_ds.InstanceNumber = 3
    late = tmp_path / "late.dcm"
    late_ds.save_as(late, enforce_file_format=True)
    assert storescu(edge.port, [late]).returncode == 0
    edge.wait_idle(90)
    reports = _wait_reports(orthanc, 2)
    (successor,) = [ds for uid, ds in reports.items() if uid != original.SOPInstanceUID]
    assert successor.StudyInstanceUID == original.StudyInstanceUID
    assert successor.SeriesInstanceUID == original.SeriesInstanceUID
    (item,) = successor.PredecessorDocumentsSequence
    (series,) = item.ReferencedSeriesSequence
    (ref,) = series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == original.SOPClassUID
    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for study in successor.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for sop in s.ReferencedSOPSequence
    }
    assert str(late_ds.SOPInstanceUID) in evidence and len(evidence) == 3

    # The PACS sends an image again: the study runs again on the same images, so it is the same SR again.
    runs_before = cast(int, edge.query("SELECT COUNT(*) FROM runs")[0][0])
    assert storescu(edge.port, [late]).returncode == 0
    edge.wait_idle(90)
    assert edge.query("SELECT COUNT(*) FROM runs")[0][0] == runs_before + 1
    assert set(_reports(orthanc)) == set(reports)
    assert edge.stop() == 0
