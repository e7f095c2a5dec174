"""The input envelope monitor: per model version, how many of the latest analysed images lay outside the
model's input envelope, and whether that is more than a clinic like the validation set shows.

A bundle's envelope (``edge_node.protocol.manifest.InputEnvelope``) is set so that ``1 - quantile`` of images
like its validation images (1 %) fall outside by chance. One image outside says little; a clinic where far
more do, over its latest ``WINDOW`` analysed images, is sending images the model was never checked on
(another scanner or protocol, an inverted display, another body part). The monitor warns when the protocol's
``drift_alarm`` says so (one-sided binomial tail below ``DRIFT_ALARM_P``, at ``DRIFT_TOLERANCE`` times the
chance rate: the same rule the exporter's and the benchmark's figures use) and the window holds at least
``MIN_IMAGES`` images. docs/envelope.md describes the method.

An envelope with an intensity part also judges each image's own grey values; an image outside either part is
outside. The window then counts too how many lay outside the intensity part and how many of those look like
negatives of the validation images. When the intensity count alone raises the alarm and at least half of
those images look negative (the protocol's ``looks_negative``), the warning names the likely cause: a display
header that says the wrong thing.

Each analysed image's result is one row of ``envelope_results``, written in the transaction that records its
run (``Runs.finish``), so the window survives a restart and the clinician page can mark a run's study. A
study analysed again counts again: the window is of analyses, not of distinct images. Counts only leave the
node (status, heartbeat); never a UID. The row also keeps the features the image was judged on, for the
latest ``FEATURES_KEPT`` rows of each model version (``edge_node.state.envelope_features``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_node.protocol.envelope import drift_alarm
from edge_node.protocol.envelope import looks_negative as negatives_alarm
from edge_node.state.database import Database
from edge_node.state.envelope_features import feature_blob, prune_features

__all__ = [
    "MIN_IMAGES",
    "WINDOW",
    "EnvelopeMonitor",
    "EnvelopeResult",
    "EnvelopeWindow",
    "record_envelope_results",
]

#: The latest analysed images per model version the rate is taken over.
WINDOW = 200
#: Fewer images than this in the window and no warning is given, however many lay outside.
MIN_IMAGES = 30


@dataclass(frozen=True)
class EnvelopeResult:
    """One analysed image's envelope result, as a run records it."""

    sop_instance_uid: str
    outside: bool
    #: The image's envelope distance as a multiple of the threshold (above 1: outside).
    ratio: float
    #: Outside the envelope's intensity part, and looking like a negative of the validation images; None
    #: when the envelope has no intensity part.
    intensity_outside: bool | None = None
    negative: bool | None = None
    #: The features the result was judged on, kept for the envelope's federated refit
    #: (``edge_node.state.envelope_features``): the embedding (D,) and the image's own grey-value features
    #: (L,); None when absent (NULL).
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    intensity_features: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EnvelopeWindow:
    """The latest analysed images of one model version and how many of them lay outside its envelope (and,
    with an intensity part, outside that part and looking negative)."""

    model_id: str
    model_version: str
    #: The window's size: at most this many of the latest images are counted.
    window: int
    images: int
    outside: int
    #: The envelope's quantile (from the signed manifest): ``1 - quantile`` fall outside by chance.
    quantile: float
    #: Of ``outside``, how many lay outside the intensity part, and how many of those look negative; None
    #: when no image of the window has an intensity result (the envelope has no intensity part).
    intensity_outside: int | None = None
    negative: int | None = None

    @property
    def rate(self) -> float:
        return self.outside / self.images if self.images else 0.0

    @property
    def expected_rate(self) -> float:
        """The share of images like the validation images that lies outside by chance: ``1 - quantile``, or
        with an intensity part up to twice that (each part lets ``1 - quantile`` through; an image outside
        both counts once)."""
        parts = 1 if self.intensity_outside is None else 2
        return parts * (1.0 - self.quantile)

    @property
    def expected_words(self) -> str:
        """``expected_rate`` in words: "about 1.0%", or "up to 2.0%" with an intensity part."""
        return f"{'about' if self.intensity_outside is None else 'up to'} {self.expected_rate:.1%}"

    @property
    def drifting(self) -> bool:
        """Far more images outside than a clinic like the validation set shows, on enough images to say so."""
        return self.images >= MIN_IMAGES and drift_alarm(self.outside, self.images, self.quantile)

    @property
    def looks_negative(self) -> bool:
        """Far more images with grey values unlike the validation images' than chance explains, most of
        them like negatives of those images (the protocol's ``looks_negative``), on enough images to say
        so; False without an intensity part."""
        if self.intensity_outside is None or self.negative is None or self.images < MIN_IMAGES:
            return False
        return negatives_alarm(self.intensity_outside, self.negative, self.images, self.quantile)

    def warning(self) -> str | None:
        """A plain-words warning when the window is drifting (with the likely cause when its images look
        negative), else None."""
        said: list[str] = []
        model = f"{self.model_id} {self.model_version}"
        if self.drifting:
            said.append(
                f"{self.outside} of the last {self.images} images analysed by {model} were outside its input"
                f" envelope ({self.rate:.1%}; {self.expected_words} expected by chance): this clinic may be"
                " sending images the model was never checked on (another scanner or protocol, an inverted"
                " display, another body part). Its results on them are less reliable; check the images and"
                " tell the hub operator."
            )
        if self.looks_negative:
            said.append(
                f"{self.negative} of the {self.intensity_outside} images whose grey values were unlike the"
                " validation images' look like negatives of them: check the display header (Photometric"
                " Interpretation MONOCHROME1 or MONOCHROME2, Presentation LUT Shape) at the modality or the"
                " PACS."
            )
        return " ".join(said) or None

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "model_version": self.model_version,
            "window": self.window,
            "images": self.images,
            "outside": self.outside,
            "rate": self.rate,
            "expected_rate": self.expected_rate,
            "drifting": self.drifting,
            "intensity_outside": self.intensity_outside,
            "negative": self.negative,
            "looks_negative": self.looks_negative,
            "warning": self.warning(),
        }


def record_envelope_results(
    c: sqlite3.Connection,
    run_id: int,
    model_id: str,
    model_version: str,
    quantile: float,
    results: Sequence[EnvelopeResult],
) -> None:
    """Inside the caller's transaction (the one that records the run): one row per analysed image, with the
    features it was judged on; then the model version's rows beyond the latest ``FEATURES_KEPT`` lose
    theirs (``prune_features``)."""

    def flag(value: bool | None) -> int | None:
        return None if value is None else int(value)

    c.executemany(
        "INSERT INTO envelope_results (run_id, sop_instance_uid, model_id, model_version, outside, ratio,"
        " quantile, intensity_outside, negative, embedding, intensity_features)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                run_id,
                r.sop_instance_uid,
                model_id,
                model_version,
                int(r.outside),
                float(r.ratio),
                quantile,
                flag(r.intensity_outside),
                flag(r.negative),
                feature_blob(r.embedding),
                feature_blob(r.intensity_features),
            )
            for r in results
        ],
    )
    if results:
        prune_features(c, model_id, model_version)


class EnvelopeMonitor:
    """The windows of ``envelope_results``, read from the node's database."""

    def __init__(self, db: Database, window: int = WINDOW) -> None:
        self.db = db
        self.window = window

    def window_of(self, model_id: str, model_version: str) -> EnvelopeWindow | None:
        """The latest ``window`` results of one model version; None when it has none (no envelope)."""
        rows = self.db.query(
            "SELECT outside, quantile, intensity_outside, negative FROM envelope_results"
            " WHERE model_id = ? AND model_version = ? ORDER BY id DESC LIMIT ?",
            (model_id, model_version, self.window),
        )
        if not rows:
            return None
        # Rows recorded before the node judged grey values have none: the intensity counts are over the
        # rest (fewer images than the window, which errs towards no warning until the window fills again).
        judged = [r for r in rows if r["intensity_outside"] is not None]
        return EnvelopeWindow(
            model_id=model_id,
            model_version=model_version,
            window=self.window,
            images=len(rows),
            outside=sum(int(r["outside"]) for r in rows),
            quantile=float(rows[0]["quantile"]),
            intensity_outside=sum(int(r["intensity_outside"]) for r in judged) if judged else None,
            negative=sum(int(r["negative"] or 0) for r in judged) if judged else None,
        )

    def recent(self, versions: int = 5) -> list[EnvelopeWindow]:
        """The windows of the model versions that analysed images most recently, latest first."""
        rows = self.db.query(
            "SELECT model_id, model_version, MAX(id) AS last FROM envelope_results"
            " GROUP BY model_id, model_version ORDER BY last DESC LIMIT ?",
            (versions,),
        )
        found = (self.window_of(str(r["model_id"]), str(r["model_version"])) for r in rows)
        return [w for w in found if w is not None]
