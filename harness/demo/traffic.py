"""A clinic's PACS traffic: studies go to the edge node, its SRs come back, the scores are read from them."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from edge_node.analysis.report_sr import SCORE_CODE_VALUE, envelope_concept
from harness.demo.clinic import Clinic
from harness.demo.orthanc import OrthancError
from hub.data.dicomize import dicomize_images

__all__ = ["SentStudy", "TrafficError", "send_studies", "sr_outside_envelope", "sr_score"]

#: Studies per C-STORE job Orthanc runs toward the node (one association each).
BATCH = 50


class TrafficError(RuntimeError):
    """Results did not come back into the PACS in time; the message has the tail of the node's log."""


@dataclass(frozen=True)
class SentStudy:
    study_uid: str
    truth: int
    score: float  # the model's score as the SR in the PACS states it
    #: Whether the SR says the image lay outside the model's input envelope (None: the bundle has none).
    outside_envelope: bool | None = None


def _group(sr: pydicom.Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    report = hd.sr.ComprehensiveSR.from_dataset(sr).content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError("the SR holds no measurement report")
    (group,) = report.get_image_measurement_groups()
    return group


def sr_score(sr: pydicom.Dataset) -> float:
    """The model's score from our SR: the measurement named by the score concept in its one image group."""
    (measurement,) = [m for m in _group(sr).get_measurements() if m.name.value == SCORE_CODE_VALUE]
    return float(measurement.value)


def sr_outside_envelope(sr: pydicom.Dataset) -> bool | None:
    """Whether our SR says its image lay outside the model's input envelope; None when it says nothing."""
    said = _group(sr).get_qualitative_evaluations(name=envelope_concept())
    return None if not said else said[0].value == codes.SCT.No


def _sr_by_study(clinic: Clinic) -> dict[str, str]:
    """Orthanc study ID → the Orthanc ID of one SR instance in it (one REST call for the whole PACS)."""
    found = clinic.orthanc.client.post(
        "/tools/find", json={"Level": "Series", "Query": {"Modality": "SR"}, "Expand": True}
    )
    if found.status_code != 200:
        raise OrthancError(f"/tools/find -> {found.status_code}: {found.text[:300]}")
    return {str(s["ParentStudy"]): str(s["Instances"][0]) for s in found.json() if s["Instances"]}


def send_studies(
    clinic: Clinic, images: np.ndarray, labels: np.ndarray, out: Path, *, tag: str, timeout: float = 600.0
) -> list[SentStudy]:
    """Store ``images`` (N, H, W) uint8 in the PACS as N single-image CR studies with fresh UIDs, send them
    all to the node, and wait until every one has its SR back in the PACS; the scores come from those SRs."""
    written = dicomize_images(images, out, dataset="pneumoniamnist", split=tag)
    orthanc_ids = [str(clinic.orthanc.upload(w.path)["ParentStudy"]) for w in written]
    for start in range(0, len(orthanc_ids), BATCH):
        clinic.orthanc.store_to_modality("edge", orthanc_ids[start : start + BATCH], timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        srs = _sr_by_study(clinic)
        missing = [i for i in orthanc_ids if i not in srs]
        if not missing:
            break
        if time.monotonic() > deadline or not clinic.edge.alive():
            raise TrafficError(
                f"{len(missing)} of {len(orthanc_ids)} studies have no SR in the PACS after {timeout:.0f} s; "
                f"edge log:\n{clinic.edge.log_text()[-4000:]}"
            )
        time.sleep(0.5)
    out_rows = []
    for w, study_id in zip(written, orthanc_ids, strict=True):
        sr = pydicom.dcmread(io.BytesIO(clinic.orthanc.instance_file(srs[study_id])))
        out_rows.append(
            SentStudy(w.study_instance_uid, int(labels[w.index]), sr_score(sr), sr_outside_envelope(sr))
        )
    return out_rows
