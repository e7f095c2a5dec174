"""Analyse one received study: select instances, preprocess, run the model, write the SR (and SC) results."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from edge_node.errors import InferenceError
from edge_node.inference.model import LoadedModel
from edge_node.preprocess import Prepared, SkipReason, preprocess
from edge_node.results.finding import Finding
from edge_node.results.sc import write_sc
from edge_node.results.sr import write_sr
from edge_node.series import Candidate, Ignored, read_header, select_instances, summarise_reasons

__all__ = ["Finding", "StudyOutcome", "analyze_study", "findings_from_probabilities"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyOutcome:
    """What became of a study: ``done`` with findings and result files, or ``skipped`` with a reason."""

    status: Literal["done", "skipped"]
    reason: str | None
    findings: list[Finding]
    outputs: list[Path]
    #: Instances that were not analysed, each with its reason (also when the study as a whole is done).
    ignored: list[Ignored] = field(default_factory=list)


@dataclass(frozen=True)
class _Analysed:
    candidate: Candidate
    dataset: Dataset
    prepared: Prepared


def findings_from_probabilities(
    probs: np.ndarray, analysed: Sequence[tuple[Candidate, int]], model: LoadedModel
) -> list[Finding]:
    """One Finding per analysed instance from (N, K) class probabilities.

    Binary: the score is the positive class's probability and the finding is present at or above the
    manifest's threshold. Multiclass: the score is the top class's probability, the label its name, and the
    finding is present unless the top class is the first (reference) class.
    """
    task = model.task
    findings: list[Finding] = []
    for row, (cand, _) in zip(probs, analysed, strict=True):
        if task.kind == "binary":
            score = float(row[task.positive_class])
            present = score >= task.decision_threshold
            negative = next((c.name for c in task.classes if c.index != task.positive_class), "absent")
            label = task.classes[task.positive_class].name if present else negative
        else:
            top = int(np.argmax(row))
            score = float(row[top])
            label = next((c.name for c in task.classes if c.index == top), str(top))
            present = top != task.classes[0].index
        h = cand.header
        findings.append(
            Finding(
                sop_instance_uid=h.sop_instance_uid,
                series_instance_uid=h.series_instance_uid,
                sop_class_uid=h.sop_class_uid,
                score=score,
                label=label,
                present=present,
                frame_index=cand.frame_index,
                number_of_frames=h.number_of_frames,
            )
        )
    return findings


def _prepare(cand: Candidate, model: LoadedModel) -> _Analysed:
    try:
        ds = dcmread(cand.header.path)
    except Exception as exc:  # a file that read as a header but not in full is malformed
        raise SkipReason("malformed DICOM file") from exc
    try:
        prepared = preprocess(
            ds, model.preprocessing, model_id=model.model_id, channels=model.channels, frame=cand.frame_index
        )
    except SkipReason:
        raise
    except Exception as exc:  # bad input must never stop the worker; the reason names the failing step
        logger.warning("preprocessing failed unexpectedly: %s", type(exc).__name__)
        raise SkipReason(f"preprocessing failed ({type(exc).__name__})") from exc
    return _Analysed(candidate=cand, dataset=ds, prepared=prepared)


def analyze_study(
    instances: Sequence[Path],
    model: LoadedModel,
    out_dir: Path,
    *,
    secondary_capture: bool = True,
) -> StudyOutcome:
    """Analyse the instances of one study and write the results into ``out_dir``.

    Never raises for bad input: unreadable files, non-images, refused modalities and undecodable pixels are
    reasons, and a study with nothing left to analyse is ``skipped``. A failing model raises InferenceError.
    """
    ignored: list[Ignored] = []
    headers = []
    for path in instances:
        try:
            headers.append(read_header(Path(path)))
        except SkipReason as skip:
            ignored.append(Ignored(path=Path(path), sop_instance_uid=None, reason=skip.reason))
    selection = select_instances(headers, model.preprocessing, model.model_id)
    ignored.extend(selection.ignored)

    analysed: list[_Analysed] = []
    for cand in selection.candidates:
        try:
            analysed.append(_prepare(cand, model))
        except SkipReason as skip:
            ignored.append(Ignored(cand.header.path, cand.header.sop_instance_uid or None, skip.reason))

    if not analysed:
        reason = summarise_reasons(ignored) if ignored else "the study has no instances"
        logger.info("study skipped: %s", reason)
        return StudyOutcome(status="skipped", reason=reason, findings=[], outputs=[], ignored=ignored)

    batch = np.stack([a.prepared.tensor for a in analysed])  # (N, C, H, W)
    try:
        probs = model.probabilities(batch)
    except Exception as exc:
        raise InferenceError(
            f"model {model.model_id} {model.model_version} failed on {len(analysed)} image(s) "
            f"({type(exc).__name__}: {exc}); check the bundle and the runtime"
        ) from exc
    findings = findings_from_probabilities(probs, [(a.candidate, i) for i, a in enumerate(analysed)], model)

    outputs: list[Path] = []
    by_study: dict[str, list[int]] = {}
    for i, a in enumerate(analysed):
        by_study.setdefault(a.candidate.header.study_instance_uid, []).append(i)
    for indices in by_study.values():
        sources = [analysed[i].dataset for i in indices]
        outputs.append(write_sr(sources, [findings[i] for i in indices], model.manifest, out_dir))
    if secondary_capture:
        for i, (a, f) in enumerate(zip(analysed, findings, strict=True)):
            outputs.append(write_sc(a.dataset, a.prepared.display, f, model.manifest, out_dir, index=i))
    logger.info(
        "study analysed: %d image(s), %d present, %d ignored, %d result file(s)",
        len(findings),
        sum(f.present for f in findings),
        len(ignored),
        len(outputs),
    )
    return StudyOutcome(status="done", reason=None, findings=findings, outputs=outputs, ignored=ignored)
