"""Analyse one claimed study: select instances, preprocess, run the model, write the SR (and SC) results."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from edge_node.analysis.capture_sc import capture_display
from edge_node.analysis.capture_template import write_fast_sc
from edge_node.analysis.findings import AnalysedImage, Finding, findings_from_probabilities
from edge_node.analysis.preprocessing import Prepared, SkipReason, preprocess
from edge_node.analysis.report_sr import sr_series_uid
from edge_node.analysis.report_template import write_fast_sr
from edge_node.analysis.result_file import ResultFile
from edge_node.analysis.selection import (
    Candidate,
    Ignored,
    InstanceHeader,
    read_instance,
    row_reason,
    select_instances,
    summarise_reasons,
)
from edge_node.errors import InferenceError
from edge_node.inference.loaded_model import LoadedModel, ModelScores
from edge_node.state.runs import InstanceRow, ReportRef

__all__ = ["PreparedStudy", "StudyOutcome", "analyze_study", "finish_study", "prepare_study", "score_studies"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyOutcome:
    """What became of a study: ``done`` with findings and result files, or ``skipped`` with a reason."""

    status: Literal["done", "skipped"]
    reason: str | None
    findings: list[Finding]
    outputs: list[ResultFile]
    #: Instances that were not analysed, each with its reason (also when the study as a whole is done).
    ignored: list[Ignored] = field(default_factory=list)
    #: The SR this run wrote (None when skipped): the next run's SR names it as its predecessor.
    report: ReportRef | None = None


@dataclass(frozen=True)
class _Analysed:
    candidate: Candidate
    dataset: Dataset
    prepared: Prepared

    @property
    def image(self) -> AnalysedImage:
        h = self.candidate.header
        return AnalysedImage(
            sop_instance_uid=h.sop_instance_uid,
            series_instance_uid=h.series_instance_uid,
            sop_class_uid=h.sop_class_uid,
            frame_index=self.candidate.frame_index,
            number_of_frames=h.number_of_frames,
        )


def _release_pixels(ds: Dataset) -> None:
    """Drop the decoded and the raw pixel data of ``ds``: the results need only its header from here on."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            del ds[keyword]
    ds._pixel_array = None  # pydicom's cache of the decoded array, if it made one
    ds._pixel_id = {}


def _prepare(cand: Candidate, ds: Dataset, model: LoadedModel, *, keep_display: bool) -> _Analysed:
    """Preprocess one instance, keeping only its model input (and a capture-sized display image).

    Streaming: a study's instances are decoded one at a time and only the small outputs stay, so a study's
    memory does not grow with its number or size of images.
    """
    try:
        prepared = preprocess(ds, model.preprocessing, channels=model.channels, frame=cand.frame_index)
    except SkipReason:
        raise
    except Exception as exc:  # bad input must never stop the worker; the reason names the failing step
        logger.warning("preprocessing failed unexpectedly: %s", type(exc).__name__)
        raise SkipReason(f"preprocessing failed ({type(exc).__name__})") from None
    finally:
        _release_pixels(ds)
    display = capture_display(prepared.display) if keep_display else np.zeros((1, 1), dtype=np.float32)
    prepared = Prepared(tensor=prepared.tensor, display=display, frame_index=prepared.frame_index)
    return _Analysed(candidate=cand, dataset=ds, prepared=prepared)


@dataclass
class PreparedStudy:
    """A study read and preprocessed, waiting for the model: its images' inputs and what was left out."""

    analysed: list[_Analysed]
    ignored: list[Ignored]

    @property
    def batch(self) -> np.ndarray:
        return np.stack([a.prepared.tensor for a in self.analysed])  # (N, C, H, W)


def prepare_study(
    instances: Sequence[InstanceRow], model: LoadedModel, *, secondary_capture: bool = True
) -> PreparedStudy | StudyOutcome:
    """Select, read and preprocess a study's instances: a PreparedStudy, or the ``skipped`` outcome.

    The rows decide first (no file read for a non-image or a refused modality); each remaining file is read
    once. Never raises for bad input: unreadable files, non-images, refused modalities and undecodable
    pixels are reasons, and a study with nothing left to analyse is ``skipped``.
    """
    ignored: list[Ignored] = []
    headers: list[InstanceHeader] = []
    datasets: dict[Path, Dataset] = {}
    for row in instances:
        reason = row_reason(row, model.preprocessing, model.model_id)
        if reason is None:
            try:
                header, ds = read_instance(row.path)
            except SkipReason as skip:
                reason = skip.reason
            else:
                headers.append(header)
                datasets[header.path] = ds
        if reason is not None:
            ignored.append(
                Ignored(path=row.path, sop_instance_uid=row.sop_instance_uid or None, reason=reason)
            )
    selection = select_instances(headers, model.preprocessing)
    ignored.extend(selection.ignored)

    analysed: list[_Analysed] = []
    for cand in selection.candidates:
        try:
            analysed.append(_prepare(cand, datasets[cand.header.path], model, keep_display=secondary_capture))
        except SkipReason as skip:
            ignored.append(Ignored(cand.header.path, cand.header.sop_instance_uid or None, skip.reason))

    if not analysed:
        reason = summarise_reasons(ignored) if ignored else "the study has no instances"
        logger.info("study skipped: %s", reason)
        return StudyOutcome(status="skipped", reason=reason, findings=[], outputs=[], ignored=ignored)
    return PreparedStudy(analysed=analysed, ignored=ignored)


def _scores(model: LoadedModel, batch: np.ndarray) -> ModelScores:
    try:
        return model.scores(batch)
    except Exception as exc:
        raise InferenceError(
            f"model {model.model_id} {model.model_version} failed on {batch.shape[0]} image(s) "
            f"({type(exc).__name__}: {exc}); check the bundle and the runtime"
        ) from exc


def score_studies(studies: Sequence[PreparedStudy], model: LoadedModel) -> list[ModelScores | InferenceError]:
    """The model's scores for every image of several studies, in one run: one ModelScores per study.

    The scores are the probabilities and, when the bundle has an input envelope, each image's envelope
    result from the same run. When the run over all of them fails, each study is run alone, so that one
    study's bad input fails that study only (its entry is the InferenceError).
    """
    if not studies:
        return []
    try:
        scores = _scores(model, np.concatenate([s.batch for s in studies]))
    except InferenceError:
        if len(studies) == 1:
            raise
        out: list[ModelScores | InferenceError] = []
        for study in studies:
            try:
                out.append(_scores(model, study.batch))
            except InferenceError as exc:
                out.append(exc)
        return out
    return list(scores.split([len(s.analysed) for s in studies]))


def _unusable(finding: Finding) -> str | None:
    """Why a finding cannot reach a result (a broken model or input), or None."""
    if not math.isfinite(finding.score):
        return "the model's score is not finite"
    if finding.envelope_ratio is not None and not math.isfinite(finding.envelope_ratio):
        return "the model's embedding is not finite"
    return None


def finish_study(
    study: PreparedStudy,
    scores: ModelScores,
    model: LoadedModel,
    out_dir: Path,
    *,
    secondary_capture: bool = True,
    predecessor: ReportRef | None = None,
) -> StudyOutcome:
    """Findings from the model's scores, and the SR (and SCs) written durably into ``out_dir``."""
    analysed, ignored = study.analysed, list(study.ignored)
    scored = findings_from_probabilities(
        scores.probabilities,
        [a.image for a in analysed],
        model.task,
        outside_envelope=scores.outside_envelope,
        envelope_ratio=scores.envelope_ratio,
        intensity_outside=scores.intensity_outside,
        negative=scores.negative,
        embedding=scores.embedding,
        intensity_features=scores.intensity_features,
    )
    # A non-finite score or embedding (a broken model or input) is that instance's reason; it never reaches
    # a result.
    kept: list[int] = []
    for i, f in enumerate(scored):
        reason = _unusable(f)
        if reason is None:
            kept.append(i)
            continue
        h = analysed[i].candidate.header
        ignored.append(Ignored(h.path, h.sop_instance_uid or None, reason))
    analysed = [analysed[i] for i in kept]
    findings = [scored[i] for i in kept]
    if not analysed:
        reason = summarise_reasons(ignored)
        logger.info("study skipped: %s", reason)
        return StudyOutcome(status="skipped", reason=reason, findings=[], outputs=[], ignored=ignored)

    outputs: list[ResultFile] = []
    by_study: dict[str, list[int]] = {}
    for i, a in enumerate(analysed):
        by_study.setdefault(a.candidate.header.study_instance_uid, []).append(i)
    for indices in by_study.values():
        sources = [analysed[i].dataset for i in indices]
        sr = write_fast_sr(
            sources, [findings[i] for i in indices], model.manifest, out_dir, predecessor=predecessor
        )
        outputs.append(sr)
    first_study = next(iter(by_study))
    report = ReportRef(outputs[0].sop_instance_uid, sr_series_uid(first_study, model.manifest))
    if secondary_capture:
        for i, (a, f) in enumerate(zip(analysed, findings, strict=True)):
            outputs.append(write_fast_sc(a.dataset, a.prepared.display, f, model.manifest, out_dir, index=i))
    # Counts only: the envelope's part is there when the bundle has one (the line is as before otherwise).
    outside = sum(bool(f.outside_envelope) for f in findings)
    envelope = "" if model.envelope is None else f", {outside:d} outside the input envelope"
    logger.info(
        "study analysed: %d image(s), %d present, %d ignored, %d result file(s)%s",
        len(findings),
        sum(f.present for f in findings),
        len(ignored),
        len(outputs),
        envelope,
    )
    return StudyOutcome(
        status="done", reason=None, findings=findings, outputs=outputs, ignored=ignored, report=report
    )


def analyze_study(
    instances: Sequence[InstanceRow],
    model: LoadedModel,
    out_dir: Path,
    *,
    secondary_capture: bool = True,
    predecessor: ReportRef | None = None,
) -> StudyOutcome:
    """Analyse the instances of one study and write the results into ``out_dir`` (the three stages in one).

    Never raises for bad input (see ``prepare_study``); a failing model raises InferenceError.
    ``predecessor`` is the SR an earlier run sent for this study.
    """
    prepared = prepare_study(instances, model, secondary_capture=secondary_capture)
    if isinstance(prepared, StudyOutcome):
        return prepared
    (scores,) = score_studies([prepared], model)
    assert not isinstance(scores, InferenceError)  # a single study's failure is raised
    return finish_study(
        prepared, scores, model, out_dir, secondary_capture=secondary_capture, predecessor=predecessor
    )
