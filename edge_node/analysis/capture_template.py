"""The Secondary Capture of one model version built fast: highdicom builds it once, each result fills it in.

highdicom's ``SCImage.from_ref_dataset`` checks the standard's tables for every capture (~15 ms: is the
source an image, does the SC IOD hold a content date). What differs between two captures of one model
version is only: the rendered pixels and their size, the source's patient and study attributes, character
set, orientation and laterality, the reference to the source image, the acquisition equipment, the UIDs,
the instance number and the times. The template is ``build_sc`` on a probe image; every other element is
shared, encoded once. The result equals ``build_sc``'s element by element (a test holds them side by side),
the creation times aside.
"""

from __future__ import annotations

import datetime
import threading
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import DA, TM

from edge_node.analysis.capture_sc import build_sc, caption, orientation, render, source_reference
from edge_node.analysis.findings import Finding
from edge_node.analysis.result_file import ResultFile, save_result
from edge_node.analysis.result_parts import acquisition_equipment, encoded, mark_encoded
from edge_node.analysis.result_uids import result_uid
from edge_node.analysis.source_view import for_highdicom, restore_source
from edge_node.protocol.manifest import Manifest

__all__ = ["CaptureTemplate", "fast_sc", "write_fast_sc"]

#: Set for each capture; every other element of the template is shared.
_PER_CAPTURE = frozenset(
    tag_for_keyword(k)
    for k in (
        "SpecificCharacterSet",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "SOPInstanceUID",
        "ContentDate",
        "ContentTime",
        "DateOfSecondaryCapture",
        "TimeOfSecondaryCapture",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "InstanceNumber",
        "PatientOrientation",
        "Laterality",
        "ContributingEquipmentSequence",
        "SourceImageSequence",
        "Rows",
        "Columns",
        "PixelData",
    )
)


class CaptureTemplate:
    """What every capture of one model version shares, and the fast build of one capture from it."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        probe = Dataset()
        probe.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR: an image class highdicom knows
        probe.SOPInstanceUID, probe.StudyInstanceUID, probe.SeriesInstanceUID = (
            generate_uid() for _ in range(3)
        )
        finding = Finding(
            str(probe.SOPInstanceUID), str(probe.SeriesInstanceUID), str(probe.SOPClassUID), 0.5, "", False
        )
        ref = build_sc(probe, np.zeros((8, 8)), finding, manifest, 0)
        self._shared = [encoded(e) for e in ref if e.tag not in _PER_CAPTURE]
        self._file_meta = ref.file_meta
        self._has_content_date = "ContentDate" in ref

    def build(
        self,
        source: Dataset,
        display: np.ndarray,
        finding: Finding,
        index: int,
        *,
        now: datetime.datetime | None = None,
    ) -> Dataset:
        """The capture ``build_sc`` would make for this source, image and finding (same UIDs)."""
        m = self.manifest
        study_uid = str(source.StudyInstanceUID)
        pixels = render(display, caption(finding, m))  # (H, W) uint8
        view = for_highdicom(source, pixels=False)
        now = now or datetime.datetime.now()
        sc = Dataset()
        for raw in self._shared:
            sc[raw.tag] = raw
        charset = view.get("SpecificCharacterSet")
        if charset is not None:  # highdicom takes the character set of the reference dataset
            sc.SpecificCharacterSet = charset
        sc.SOPInstanceUID = result_uid(
            "sc", study_uid, m.model_id, m.model_version, finding.sop_instance_uid, str(finding.frame_index)
        )
        sc.StudyInstanceUID = study_uid
        sc.SeriesInstanceUID = result_uid("sc-series", study_uid, m.model_id, m.model_version)
        sc.InstanceNumber = index + 1
        sc.InstanceCreationDate, sc.InstanceCreationTime = DA(now.date()), TM(now.time())
        if self._has_content_date:
            sc.ContentDate, sc.ContentTime = DA(now.date()), TM(now.time())
        sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = DA(now.date()), TM(now.time())
        equipment: list[Dataset] = []
        acquisition = acquisition_equipment(view)
        if acquisition is not None:
            equipment.append(acquisition)
        equipment.append(hd.ContributingEquipment.for_highdicom())
        sc.ContributingEquipmentSequence = equipment
        sc.Rows, sc.Columns = pixels.shape
        sc.PixelData = pixels.tobytes()
        restore_source(sc, source)
        side = str(source.get("Laterality", "") or "")
        sc.Laterality = side if side in ("R", "L") else ""
        sides = orientation(source)
        sc.PatientOrientation = list(sides) if sides is not None else None
        sc.SourceImageSequence = [source_reference(finding)]
        meta = FileMetaDataset()
        for elem in self._file_meta:
            meta.add(elem)
        meta.MediaStorageSOPInstanceUID = UID(str(sc.SOPInstanceUID))
        sc.file_meta = meta
        mark_encoded(sc)
        return sc


_templates: dict[tuple[str, str], CaptureTemplate] = {}
_templates_lock = threading.Lock()


def fast_sc(
    source: Dataset, display: np.ndarray, finding: Finding, manifest: Manifest, index: int
) -> Dataset:
    """``build_sc`` through the template of ``manifest``'s model version (built on first use)."""
    key = (manifest.model_id, manifest.model_version)
    with _templates_lock:
        template = _templates.get(key)
        if template is None or template.manifest != manifest:
            template = _templates[key] = CaptureTemplate(manifest)
    return template.build(source, display, finding, index)


def write_fast_sc(
    source: Dataset, display: np.ndarray, finding: Finding, manifest: Manifest, out_dir: Path, index: int = 0
) -> ResultFile:
    """Build the capture through the template and write it durably into ``out_dir``."""
    sc = fast_sc(source, display, finding, manifest, index)
    return save_result(sc, out_dir, "sc")
