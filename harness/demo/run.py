"""The demo: train and sign a student, deploy it to clinic nodes with their own PACS, read the results."""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from rich.console import Console
from rich.table import Table

from harness.demo.clinic import BundleFiles, Clinic
from hub.data.dicomize import dicomize_images
from hub.data.medmnist import data_root, load_medmnist
from hub.training.supervised import binary_auc

log = logging.getLogger(__name__)

DATASET = "pneumoniamnist"


@dataclass
class StudyResult:
    clinic: str
    index: int
    truth: int
    score: float | None
    latency_s: float | None
    sr: bool
    sc: bool


@dataclass
class ClinicReport:
    name: str
    results: list[StudyResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def sr_score(sr: pydicom.Dataset) -> float:
    """The model's score from our SR: the one numeric measurement of its image measurement group."""
    report = hd.sr.ComprehensiveSR.from_dataset(sr).content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError("the SR holds no measurement report")
    (group,) = report.get_image_measurement_groups()
    (measurement,) = group.get_measurements()
    return float(measurement.value)


def run_clinic(
    clinic: Clinic, name: str, indices: Sequence[int], labels: np.ndarray, out: Path
) -> ClinicReport:
    """The PACS sends each study to the node; the SR and SC must come back into the same PACS study."""
    images = load_medmnist(DATASET, "test").images
    studies = dicomize_images(images, out, dataset=DATASET, split="test", indices=indices)
    report = ClinicReport(name)
    for study in studies:
        study_id = clinic.upload_study([study.path])
        started = time.monotonic()
        clinic.push(study_id)
        series = clinic.wait_results(study_id, ("SR", "OT") if clinic.secondary_capture else ("SR",))
        latency = time.monotonic() - started
        (sr_series,) = series["SR"]
        sr = pydicom.dcmread(io.BytesIO(clinic.orthanc.instance_file(sr_series["Instances"][0])))
        report.results.append(
            StudyResult(
                clinic=name,
                index=study.index,
                truth=int(labels[study.index]),
                score=sr_score(sr),
                latency_s=latency,
                sr=True,
                sc="OT" in series,
            )
        )
    return report


def send_ct_study(clinic: Clinic, shared: Path) -> str:
    """A real CT study the chest X-ray model does not take: the node stores it and skips it with a reason."""
    files = sorted((shared / "dicom" / "tcia_covid19_ny_sbu" / "A002304").glob("axial_*.dcm"))[:1]
    study_id = clinic.upload_study(files)
    clinic.push(study_id)
    return study_id


def results_table(reports: Sequence[ClinicReport]) -> Table:
    table = Table(
        title="clinic path: PACS → edge node → SR + SC back in the PACS (real PneumoniaMNIST test images)"
    )
    for column in (
        "clinic",
        "studies",
        "SR in PACS",
        "SC in PACS",
        "skipped",
        "accuracy",
        "AUC",
        "p50 s",
        "max s",
    ):
        table.add_column(column, justify="right" if column != "clinic" else "left")
    for rep in reports:
        truth = np.array([r.truth for r in rep.results])
        scores = np.array([r.score for r in rep.results if r.score is not None])
        latencies = np.array([r.latency_s for r in rep.results if r.latency_s is not None])
        accuracy = float(np.mean((scores >= 0.5) == (truth == 1))) if len(scores) else float("nan")
        auc = binary_auc(truth, scores) if len(scores) == len(truth) else math.nan
        table.add_row(
            rep.name,
            str(len(rep.results)),
            str(sum(r.sr for r in rep.results)),
            str(sum(r.sc for r in rep.results)),
            str(len(rep.skipped)),
            f"{accuracy:.2f}",
            "-" if math.isnan(auc) else f"{auc:.3f}",
            f"{np.median(latencies):.2f}" if len(latencies) else "-",
            f"{latencies.max():.2f}" if len(latencies) else "-",
        )
    return table


def skipped_lines(reports: Sequence[ClinicReport]) -> list[str]:
    return [f"{rep.name} skipped a study: {reason}" for rep in reports for reason in rep.skipped]


def deploy_and_run(
    bundle: BundleFiles, workdir: Path, *, clinics: int, studies_per_clinic: int, console: Console
) -> list[ClinicReport]:
    labels = load_medmnist(DATASET, "test").labels
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    reports: list[ClinicReport] = []
    for c in range(clinics):
        name = f"clinic-{chr(ord('A') + c)}"
        chosen = [int(i) for i in order[c * studies_per_clinic : (c + 1) * studies_per_clinic]]
        with console.status(f"{name}: starting Orthanc and the edge node"):
            clinic = Clinic(workdir=workdir / name, bundle=bundle, ae_title=f"EDGE{c + 1}").start()
        try:
            with console.status(f"{name}: PACS sends {len(chosen)} CR studies, waiting for the SRs"):
                report = run_clinic(clinic, name, chosen, labels, workdir / name / "studies")
            if c == 0:
                send_ct_study(clinic, data_root())
                report.skipped.append(clinic.wait_skipped(timeout=60.0))
            reports.append(report)
            if c == 0:
                console.print(f"[bold]{name}[/bold]: `fedclinic-edge status` on the node")
                # Already laid out by the node's own rich table: print it as it is, not re-wrapped.
                console.out(clinic.edge.cli("status", "--limit", "5").stdout, highlight=False)
        finally:
            clinic.stop()
    return reports
