"""Build one throw-away SR and SC at start, so that the first real study does not pay highdicom's set-up.

highdicom reads the DICOM standard's module tables (~0.6 s), the model's SR template is built (with
highdicom), and PIL loads its font the first time a result is built. The warm-up builds both objects in
memory from a synthetic image (no patient data, nothing written).
"""

from __future__ import annotations

import time

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from edge_node.analysis.capture_template import fast_sc
from edge_node.analysis.findings import Finding
from edge_node.analysis.report_template import fast_sr
from edge_node.protocol.manifest import Manifest

__all__ = ["synthetic_source", "warm_up_results"]

_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def synthetic_source() -> Dataset:
    """An 8x8 CR image with fresh UIDs and placeholder patient data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(_CR_IMAGE_STORAGE)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "WARMUP^SYNTHETIC", "WARMUP"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20000101", "000000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.PatientOrientation = "CR", ["L", "F"]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(64)
    return ds


def warm_up_results(manifest: Manifest) -> float:
    """Build an SR and an SC for ``manifest``'s model in memory; returns the seconds it took."""
    t0 = time.perf_counter()
    source = synthetic_source()
    grey = None if manifest.envelope is None or manifest.envelope.intensity is None else False
    finding = Finding(
        sop_instance_uid=str(source.SOPInstanceUID),
        series_instance_uid=str(source.SeriesInstanceUID),
        sop_class_uid=_CR_IMAGE_STORAGE,
        score=0.5,
        label=manifest.task.classes[0].name,
        present=False,
        # A multiclass finding carries every class's probability: warm the group a real study uses.
        probabilities=(() if manifest.task.kind == "binary" else (0.0,) * len(manifest.task.classes)),
        # With an input envelope every group says where its image lies: warm the group of an image within.
        outside_envelope=None if manifest.envelope is None else False,
        envelope_ratio=None if manifest.envelope is None else 0.5,
        # And with its grey-value part whether the image looks negative.
        intensity_outside=grey,
        negative=grey,
    )
    fast_sr([source], [finding], manifest)  # builds the model's SR template
    fast_sc(source, np.zeros((8, 8), dtype=np.float64), finding, manifest, 0)  # and its SC template
    return time.perf_counter() - t0
