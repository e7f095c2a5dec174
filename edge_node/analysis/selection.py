"""Which instances of a study get analysed: non-images and refused modalities out, the manifest's rules.

Two steps, each fact checked once. ``row_reason`` decides from the row ingest recorded (SOP class, modality),
before any file is opened: a study of the wrong modality is skipped without reading it. The files left are
read once (``read_instance``, pixel data deferred), and ``select_instances`` applies the series and frame
rules to their headers; preprocessing then works on the same data sets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from edge_node.analysis.preprocessing import SkipReason, check_modality_value, number_of_frames, select_frame
from edge_node.protocol.manifest import Preprocessing
from edge_node.state.runs import InstanceRow

__all__ = [
    "Candidate",
    "Ignored",
    "InstanceHeader",
    "Selection",
    "header_from_dataset",
    "non_image_reason",
    "read_header",
    "read_instance",
    "row_reason",
    "select_instances",
    "summarise_reasons",
]

logger = logging.getLogger(__name__)

_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_SEG = "1.2.840.10008.5.1.4.1.1.66.4"
_PRESENTATION_STATE_PREFIX = "1.2.840.10008.5.1.4.1.1.11."
_ENCAPSULATED_PREFIX = "1.2.840.10008.5.1.4.1.1.104."
_RT_PREFIX = "1.2.840.10008.5.1.4.1.1.481."
_NON_IMAGE_MODALITIES = {
    "SR": "structured report",
    "SEG": "segmentation",
    "PR": "presentation state",
    "KO": "key object selection",
    "DOC": "document",
    "RTSTRUCT": "RT structure set",
    "RTPLAN": "RT plan",
}


@dataclass(frozen=True)
class InstanceHeader:
    """What selection needs from one instance, read without its pixel data."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    instance_number: int | None
    number_of_frames: int
    has_pixels: bool
    #: Position along the slice normal (mm), when the header has the geometry.
    position: float | None


@dataclass(frozen=True)
class Candidate:
    """One instance to analyse, and the frame of it that goes to the model."""

    header: InstanceHeader
    frame_index: int


@dataclass(frozen=True)
class Ignored:
    """An instance that is not analysed, and why (PHI-free)."""

    path: Path
    sop_instance_uid: str | None
    reason: str


@dataclass(frozen=True)
class Selection:
    candidates: list[Candidate]
    ignored: list[Ignored]


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _position(ds: Dataset) -> float | None:
    ipp = ds.get("ImagePositionPatient")
    iop = ds.get("ImageOrientationPatient")
    if not ipp or not iop or len(ipp) != 3 or len(iop) != 6:
        return None
    try:
        r = [float(v) for v in iop[:3]]
        c = [float(v) for v in iop[3:]]
        p = [float(v) for v in ipp]
    except (TypeError, ValueError):
        return None
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return sum(n * x for n, x in zip(normal, p, strict=True))


def header_from_dataset(ds: Dataset, path: Path) -> InstanceHeader:
    sop_class = str(
        ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", {}), "MediaStorageSOPClassUID", "")
    )
    return InstanceHeader(
        path=path,
        sop_class_uid=sop_class,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or "").strip().upper(),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        number_of_frames=number_of_frames(ds),
        has_pixels="PixelData" in ds,
        position=_position(ds),
    )


def read_instance(path: Path) -> tuple[InstanceHeader, Dataset]:
    """Read one DICOM file once (large values such as pixel data deferred until used) and its header.

    SkipReason when it is not a readable DICOM file.
    """
    try:
        ds = dcmread(path, defer_size="64 KB")
        header = header_from_dataset(ds, path)
    except Exception as exc:
        # Any failure of one file is that file's reason, never the study's: pydicom raises its own
        # InvalidDicomError, ValueError, an unsupported-feature error for an unknown VR, RecursionError
        # for deep nesting and more. Only the class is logged: pydicom's texts can quote element values.
        logger.info("unreadable DICOM file %s: %s", path.name, type(exc).__name__)
        raise SkipReason("not a readable DICOM file") from None
    return header, ds


def read_header(path: Path) -> InstanceHeader:
    """The header of a DICOM file (pixel data deferred, not loaded); SkipReason if it is not DICOM."""
    return read_instance(path)[0]


def non_image_reason(sop_class_uid: str, modality: str) -> str | None:
    """Why an object is not an image for a model (SR, SC, SEG, ...), by its SOP class and modality."""
    uid = sop_class_uid
    modality = modality.strip().upper()
    name = UID(uid).name if uid else "unknown SOP class"
    if uid.startswith(_SR_PREFIX) or modality == "SR":
        return f"{name} is a structured report, not an image"
    if uid.startswith(_SC_PREFIX):
        return f"{name} is a derived image (secondary capture), not analysed"
    if uid == _SEG or modality == "SEG":
        return f"{name} is a segmentation, not an image to analyse"
    if uid.startswith((_PRESENTATION_STATE_PREFIX, _ENCAPSULATED_PREFIX, _RT_PREFIX)):
        return f"{name} is not an image"
    if modality in _NON_IMAGE_MODALITIES:
        return f"{_NON_IMAGE_MODALITIES[modality]} objects are not images"
    return None


def row_reason(row: InstanceRow, pre: Preprocessing, model_id: str) -> str | None:
    """Why an instance is not analysed, from its ingest row alone (no file read), or None."""
    modality = row.modality or ""
    reason = non_image_reason(row.sop_class_uid, modality)
    if reason is not None:
        return reason
    try:
        check_modality_value(modality, pre, model_id)
    except SkipReason as skip:
        return skip.reason
    return None


def _slice_key(h: InstanceHeader) -> tuple[float, int, str]:
    return (
        h.position if h.position is not None else 0.0,
        h.instance_number if h.instance_number is not None else 0,
        h.sop_instance_uid,
    )


def _order_key(h: InstanceHeader) -> tuple[int, str]:
    return (h.instance_number if h.instance_number is not None else 0, h.sop_instance_uid)


def select_instances(headers: Iterable[InstanceHeader], pre: Preprocessing) -> Selection:
    """Apply the manifest's series and frame rules to one study's images (``row_reason`` came first).

    Duplicates (same SOP Instance UID, e.g. a re-send) count once; an instance without pixel data is
    ignored with a reason. Per series, ``each_instance`` analyses every image and ``middle_slice`` the middle
    one by slice position (then instance number); a multi-frame instance gives the frame ``frame_rule`` picks.
    """
    ignored: list[Ignored] = []
    seen: set[str] = set()
    series: dict[str, list[InstanceHeader]] = {}
    for h in headers:
        if h.sop_instance_uid and h.sop_instance_uid in seen:
            continue
        seen.add(h.sop_instance_uid)
        if not h.has_pixels:
            ignored.append(Ignored(h.path, h.sop_instance_uid or None, "no pixel data"))
            continue
        series.setdefault(h.series_instance_uid, []).append(h)

    candidates: list[Candidate] = []
    for uid in sorted(series):
        members = series[uid]
        if pre.series_rule == "middle_slice" and len(members) > 1:
            single = sorted((m for m in members if m.number_of_frames == 1), key=_slice_key)
            chosen = [single[len(single) // 2]] if single else []
            chosen += [m for m in members if m.number_of_frames > 1]
            for m in members:
                if m not in chosen:
                    ignored.append(
                        Ignored(m.path, m.sop_instance_uid or None, "not the middle slice of its series")
                    )
        else:
            chosen = members
        for m in sorted(chosen, key=_order_key):
            try:
                frame = select_frame(m.number_of_frames, pre.frame_rule)
            except SkipReason as skip:
                ignored.append(Ignored(m.path, m.sop_instance_uid or None, skip.reason))
                continue
            candidates.append(Candidate(header=m, frame_index=frame))
    return Selection(candidates=candidates, ignored=ignored)


def summarise_reasons(ignored: Sequence[Ignored]) -> str:
    """One line from the distinct reasons, most frequent first, e.g. for a study that was skipped."""
    counts: dict[str, int] = {}
    for item in ignored:
        counts[item.reason] = counts.get(item.reason, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return "; ".join(reason if n == 1 else f"{reason} ({n} instances)" for reason, n in ordered)
