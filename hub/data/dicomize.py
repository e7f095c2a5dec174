"""Wrap MedMNIST images as DICOM instances (one study each) with synthetic, non-identifying patients.

The demo and the end-to-end tests send these to a PACS and the edge node. A grey image becomes an 8-bit
MONOCHROME2 CR instance whose window (center 128, width 256, LINEAR) maps stored 0..255 exactly onto
x / 255 in [0, 1] (PS3.3 C.11.2.1.2: y = (x - 127.5) / 255 + 0.5), the scale the training data used; so the
manifest's ``header_window`` rule and its ``bit_depth`` rule give the same model input.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    generate_uid,
)

__all__ = ["WINDOW_CENTER", "WINDOW_WIDTH", "WrappedImage", "dicomize_images", "wrap_image"]

#: LINEAR window mapping 0..255 onto [0, 1] as x / 255.
WINDOW_CENTER = 128.0
WINDOW_WIDTH = 256.0

_SOP_CLASSES = {"CR": ComputedRadiographyImageStorage, "US": UltrasoundImageStorage}
_BODY_PART = {"pneumoniamnist": "CHEST", "breastmnist": "BREAST"}


@dataclass(frozen=True)
class WrappedImage:
    """A written instance and the UIDs a test needs to find it again."""

    path: Path
    index: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


def wrap_image(
    image: np.ndarray,
    *,
    dataset: str,
    split: str,
    index: int,
    modality: str = "CR",
    when: dt.datetime | None = None,
) -> Dataset:
    """One (H, W) uint8 image as a complete DICOM instance in a new study with fresh UIDs.

    The patient is synthetic (``SYNTHETIC^<DATASET>``, ID ``SYN-<dataset>-<split>-<index>``): nothing in it
    identifies a person. ImageComments names the source image so that a test can find its pixels again.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) uint8 grey image, got {pixels.shape} {pixels.dtype}")
    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality {modality!r} is not supported; use one of {sorted(_SOP_CLASSES)}")
    when = when or dt.datetime.now()
    sop_class = _SOP_CLASSES[modality]
    sop_uid = generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient (synthetic, non-identifying)
    ds.PatientName = f"SYNTHETIC^{dataset.upper()}"
    ds.PatientID = f"SYN-{dataset}-{split}-{index:05d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    # General study
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{index:05d}"
    ds.AccessionNumber = f"SYN{index:09d}"[:16]
    ds.StudyDescription = f"MedMNIST {dataset} {split} (synthetic demo study)"
    # General series
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"{dataset} image"
    if dataset in _BODY_PART:
        ds.BodyPartExamined = _BODY_PART[dataset]
    # General equipment / image
    ds.Manufacturer = "fedclinic demo"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.ImageComments = f"MedMNIST {dataset} {split} index {index}"
    ds.BurnedInAnnotation = "NO"
    # Image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    # VOI LUT: 0..255 → [0, 1] as x / 255
    ds.WindowCenter = WINDOW_CENTER
    ds.WindowWidth = WINDOW_WIDTH
    ds.VOILUTFunction = "LINEAR"
    if modality == "CR":
        ds.ViewPosition = ""
    # SOP common
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = ds.StudyDate
    ds.InstanceCreationTime = ds.StudyTime
    return ds


def dicomize_images(
    images: np.ndarray,
    out_dir: Path,
    *,
    dataset: str,
    split: str,
    indices: Sequence[int] | None = None,
    modality: str = "CR",
) -> list[WrappedImage]:
    """Write ``images[i]`` for each index (default: all) as one single-image study each into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = list(range(images.shape[0])) if indices is None else [int(i) for i in indices]
    written: list[WrappedImage] = []
    for i in chosen:
        ds = wrap_image(images[i], dataset=dataset, split=split, index=i, modality=modality)
        path = out_dir / f"{dataset}-{split}-{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(
            WrappedImage(
                path=path,
                index=i,
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
            )
        )
    return written
