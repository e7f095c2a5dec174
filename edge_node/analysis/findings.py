"""Findings: the model's answer for each analysed instance, from its class probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_node.protocol.manifest import TaskSpec

__all__ = ["AnalysedImage", "Finding", "findings_from_probabilities"]


@dataclass(frozen=True)
class Finding:
    """The model's answer for one analysed source instance (the frame in ``frame_index``)."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    score: float
    #: The class name reported (binary: the positive class when present, else the other one).
    label: str
    present: bool
    frame_index: int = 0
    #: Number of frames of the source instance; frame references are written only for multi-frame sources.
    number_of_frames: int = 1
    #: Multiclass: every class's probability, by class index (the SR reports each); empty for binary tasks.
    probabilities: tuple[float, ...] = ()
    #: Whether the image lies outside the model's input envelope (images unlike those the model was checked
    #: on: its result is less reliable); None when the bundle has no envelope.
    outside_envelope: bool | None = None
    #: The image's envelope distance as a multiple of the envelope's threshold (above 1: outside); None when
    #: the bundle has no envelope.
    envelope_ratio: float | None = None
    #: Whether the image's grey values lie outside the envelope's intensity part (``outside_envelope`` is
    #: then True too); None when the bundle's envelope has no intensity part.
    intensity_outside: bool | None = None
    #: Whether the image looks like a negative of the validation images (outside the intensity part while
    #: its inverse lies well inside); None when the bundle's envelope has no intensity part.
    negative: bool | None = None
    #: (D,) the image's embedding that the envelope judged, kept by the node (``envelope_results``) for the
    #: envelope's federated refit; None when the bundle has no envelope. Not compared (an array).
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: (L,) the image's own grey-value features that the intensity part judged; None without one.
    intensity_features: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class AnalysedImage:
    """Which instance (and frame) a row of the model's batch came from."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    frame_index: int
    number_of_frames: int


def findings_from_probabilities(
    probs: np.ndarray,
    analysed: Sequence[AnalysedImage],
    task: TaskSpec,
    *,
    outside_envelope: np.ndarray | None = None,
    envelope_ratio: np.ndarray | None = None,
    intensity_outside: np.ndarray | None = None,
    negative: np.ndarray | None = None,
    embedding: np.ndarray | None = None,
    intensity_features: np.ndarray | None = None,
) -> list[Finding]:
    """One Finding per analysed instance from (N, K) class probabilities.

    Binary: the score is the positive class's probability and the finding is present at or above the
    manifest's threshold. Multiclass: the score is the top class's probability, the label its name, the
    finding is present unless the top class is the first (reference) class, and every class's probability
    goes with it. ``outside_envelope`` and ``envelope_ratio`` (N,), when the bundle has an input envelope,
    go with each finding as they are; so do ``intensity_outside`` and ``negative`` (N,) when the envelope
    has an intensity part. ``embedding`` (N, D) and ``intensity_features`` (N, L), the features those
    results were judged on, give each finding its row.
    """
    if (outside_envelope is None) != (envelope_ratio is None):
        raise ValueError("an input envelope result needs both the outside flags and the distance ratios")
    if (intensity_outside is None) != (negative is None):
        raise ValueError("an intensity result needs both the outside flags and the negative flags")
    if intensity_outside is not None and outside_envelope is None:
        raise ValueError("an intensity result is part of an input envelope result; the envelope's is missing")
    n = len(analysed)
    for name, features in (("embedding", embedding), ("intensity features", intensity_features)):
        if features is not None and len(features) != n:
            raise ValueError(f"{len(features)} rows of {name} for {n} analysed images")
    embeddings: list[np.ndarray | None] = [None] * n if embedding is None else list(embedding)
    greys: list[np.ndarray | None] = [None] * n if intensity_features is None else list(intensity_features)
    outside: list[bool | None] = [None] * n
    ratios: list[float | None] = [None] * n
    grey_outside: list[bool | None] = [None] * n
    negatives: list[bool | None] = [None] * n
    if outside_envelope is not None and envelope_ratio is not None:
        outside, ratios = [bool(v) for v in outside_envelope], [float(v) for v in envelope_ratio]
    if intensity_outside is not None and negative is not None:
        grey_outside, negatives = [bool(v) for v in intensity_outside], [bool(v) for v in negative]
    findings: list[Finding] = []
    for row, image, out, ratio, grey_out, neg, emb, grey in zip(
        probs, analysed, outside, ratios, grey_outside, negatives, embeddings, greys, strict=True
    ):
        probabilities: tuple[float, ...] = ()
        if task.kind == "binary":
            score = float(row[task.positive_class])
            present = score >= task.decision_threshold
            absent = next((c.name for c in task.classes if c.index != task.positive_class), "absent")
            label = task.classes[task.positive_class].name if present else absent
        else:
            top = int(np.argmax(row))
            score = float(row[top])
            label = next((c.name for c in task.classes if c.index == top), str(top))
            present = top != task.classes[0].index
            probabilities = tuple(float(v) for v in row)
        findings.append(
            Finding(
                sop_instance_uid=image.sop_instance_uid,
                series_instance_uid=image.series_instance_uid,
                sop_class_uid=image.sop_class_uid,
                score=score,
                label=label,
                present=present,
                frame_index=image.frame_index,
                number_of_frames=image.number_of_frames,
                probabilities=probabilities,
                outside_envelope=out,
                envelope_ratio=ratio,
                intensity_outside=grey_out,
                negative=neg,
                embedding=emb,
                intensity_features=grey,
            )
        )
    return findings
