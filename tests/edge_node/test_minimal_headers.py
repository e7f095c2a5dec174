"""Real-world headers through a real Orthanc: minimal (Type 1 only) and odd but legal names get results."""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_node.analysis.source_view import TYPE2_KEYWORDS
from harness.demo.orthanc import Modality, Orthanc
from tests.edge_node.conftest import EdgeProcess, TrustedBundle, dicom_dir

pytestmark = pytest.mark.slow

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
#: Legal in their VRs under ISO_IR 192 (UTF-8): accents, apostrophes, ideographs, punctuation, spaces.
ODD_VALUES = {
    "PatientName": "Ñúñez-O'Brien^Zoë Ågot^^Dr.^",
    "PatientID": "ID 0/7-ÄÖ*?#",
    "ReferringPhysicianName": "山田^太郎",
    "AccessionNumber": "A&B#12",
    "StudyID": "S#1 (x)",
}


def _pixels() -> np.ndarray:
    src = pydicom.dcmread(dicom_dir() / "pydicom_testfiles" / "dicomdirtests" / "77654033" / "CR1" / "6154")
    return np.ascontiguousarray(src.pixel_array[::4, ::4]).astype(np.uint16)  # (rows, cols)


def _minimal(path: Path, study_uid: str, sop_class: str, modality: str, pixels: np.ndarray) -> Dataset:
    """An instance with only the Type 1 elements a CR/DX image needs: no patient, no study description."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return ds


def _results(orthanc: Orthanc, study_uid: str, want: int, timeout: float = 90.0) -> list[bytes]:
    """The SR and SC files Orthanc holds in the study, once there are ``want`` of them."""
    deadline = time.time() + timeout
    found: list[bytes] = []
    while time.time() < deadline:
        study = orthanc.lookup_study(study_uid)
        found = []
        for instance in orthanc.study_instances(study) if study else []:
            data = orthanc.instance_file(instance["ID"])
            if pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).Modality in ("SR", "OT"):
                found.append(data)
        if len(found) >= want:
            return found
        time.sleep(0.3)
    raise AssertionError(f"Orthanc holds {len(found)} result(s) for the study, expected {want}")


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def edge(
    orthanc: Orthanc, edge_factory: Callable[..., EdgeProcess], test_bundle: TrustedBundle
) -> EdgeProcess:
    node = edge_factory(
        trusted_keys=str(test_bundle.public_key),
        quiet_seconds=0.5,
        send_secondary_capture=True,
        destinations=[{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
    )
    assert node.cli("install-bundle", str(test_bundle.bundle)).returncode == 0
    node.start()
    orthanc.put_modality("edge", Modality("EDGE", "127.0.0.1", node.port))
    return node


def _push(orthanc: Orthanc, files: list[Path]) -> list[str]:
    studies = []
    for path in files:
        studies.append(orthanc.upload(path)["ParentStudy"])
    unique = sorted(set(studies))
    answer = orthanc.store_to_modality("edge", unique)
    assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] == len(files)
    return unique


def test_minimal_header_cr_and_dx_studies_get_valid_sr_and_sc(
    orthanc: Orthanc, edge: EdgeProcess, tmp_path: Path
) -> None:
    pixels = _pixels()
    made = []
    for i, (sop_class, modality) in enumerate([(CR_IMAGE, "CR"), (DX_IMAGE, "DX")] * 2):
        made.append(_minimal(tmp_path / f"min{i}.dcm", generate_uid(), sop_class, modality, pixels))
    for ds in made:
        assert not any(k in ds for k in TYPE2_KEYWORDS)
    _push(orthanc, [tmp_path / f"min{i}.dcm" for i in range(len(made))])
    for ds in made:
        results = _results(orthanc, str(ds.StudyInstanceUID), 2)
        modalities = set()
        for n, data in enumerate(results):
            path = tmp_path / f"result-{ds.SOPInstanceUID}-{n}.dcm"
            path.write_bytes(data)
            assert _dciodvfy_errors(path) == [], path
            result = pydicom.dcmread(path)
            modalities.add(result.Modality)
            assert result.StudyInstanceUID == ds.StudyInstanceUID
            for keyword in TYPE2_KEYWORDS:
                # Type 2: present, and empty because the source has no value.
                assert keyword in result and result[keyword].is_empty, keyword
        assert modalities == {"SR", "OT"}
    states = {row[0] for row in edge.query("SELECT state FROM studies")}
    assert states == {"done"}


def test_odd_but_legal_names_and_ids_come_back_byte_for_byte(
    orthanc: Orthanc, edge: EdgeProcess, tmp_path: Path
) -> None:
    path = tmp_path / "odd.dcm"
    ds = _minimal(path, generate_uid(), CR_IMAGE, "CR", _pixels())
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in ODD_VALUES.items():
        setattr(ds, keyword, value)
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19700101", "O", "20260102", "0930"
    ds.save_as(path, enforce_file_format=True)
    _push(orthanc, [path])
    results = _results(orthanc, str(ds.StudyInstanceUID), 2)
    for n, data in enumerate(results):
        out = tmp_path / f"result-{n}.dcm"
        out.write_bytes(data)
        assert _dciodvfy_errors(out) == [], out
        result = pydicom.dcmread(out)
        assert result.SpecificCharacterSet == "ISO_IR 192"
        for keyword in (*ODD_VALUES, "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime"):
            assert str(result[keyword].value) == str(ds[keyword].value), keyword
    log = edge.log_text()
    for value in ODD_VALUES.values():
        for part in value.split("^"):
            if len(part) > 3:
                assert part not in log
