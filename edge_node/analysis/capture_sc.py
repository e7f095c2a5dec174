"""The result as a Secondary Capture: the analysed image with finding, score, model and a warning burnt in."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from edge_node.analysis.findings import Finding
from edge_node.analysis.report_sr import MANUFACTURER
from edge_node.analysis.result_uids import result_uid
from edge_node.analysis.source_view import for_highdicom, restore_source
from edge_node.protocol.manifest import Manifest

__all__ = [
    "LOOKS_NEGATIVE",
    "NOT_FOR_DIAGNOSIS",
    "OUTSIDE_ENVELOPE",
    "SC_SERIES_NUMBER",
    "build_sc",
    "caption",
    "capture_display",
    "orientation",
    "render",
    "source_reference",
]

logger = logging.getLogger(__name__)

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
#: Burnt in under the result of an image unlike those the model was checked on (bundles with an envelope).
OUTSIDE_ENVELOPE = "Outside the model's input envelope: result less reliable"
#: And under it when the image's grey values look like a negative of the validation images'.
LOOKS_NEGATIVE = "Its grey values look inverted (a negative image?): check the display header"
SC_SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "AI result image (fedclinic) - NOT FOR DIAGNOSTIC USE"
#: Small images (MedMNIST is 28x28) are enlarged so that the text is readable; huge ones are reduced.
MIN_SIDE = 512
MAX_SIDE = 1024
_ORIENTATION = frozenset("APLRHF")


def caption(finding: Finding, manifest: Manifest) -> list[str]:
    """The text lines burnt into the image."""
    state = "PRESENT" if finding.present else "absent"
    if manifest.task.kind == "binary":
        name = manifest.task.classes[manifest.task.positive_class].name
        first = f"{name}: {state}  (score {finding.score:.3f})"
    else:
        first = f"{finding.label}  (score {finding.score:.3f})"
    lines = [first]
    # Multiclass: every class's probability, four to a line so that the text stays readable.
    shares = [f"{c.name} {p:.3f}" for c, p in zip(manifest.task.classes, finding.probabilities, strict=False)]
    lines += ["  ".join(shares[i : i + 4]) for i in range(0, len(shares), 4)]
    if finding.outside_envelope:
        lines.append(OUTSIDE_ENVELOPE)
    if finding.negative:
        lines.append(LOOKS_NEGATIVE)
    return [*lines, f"model {manifest.model_id} {manifest.model_version}", NOT_FOR_DIAGNOSIS]


def _scaled(display: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(np.asarray(display, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(grey, mode="L")
    longest = max(img.size)
    if longest < MIN_SIDE:
        # Integer nearest-neighbour enlargement keeps the pixels the model saw recognisable.
        k = math.ceil(MIN_SIDE / longest)
        return img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    if longest > MAX_SIDE:
        f = MAX_SIDE / longest
        return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BOX)
    return img


def capture_display(display: np.ndarray) -> np.ndarray:
    """``display`` reduced to what a capture shows (longest side at most MAX_SIDE), float32 in [0, 1].

    The analyser keeps this instead of the full-resolution float64 image until the results are written.
    """
    longest = max(display.shape[:2])
    if longest <= MAX_SIDE:
        return np.asarray(display, dtype=np.float32)
    return np.asarray(_scaled(display), dtype=np.float32) / 255.0


def render(display: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """(rows, cols) image in [0, 1] → uint8 (H, W) with a black caption band on top, white text."""
    img = _scaled(display)
    size = max(12, img.width // 28)
    font = ImageFont.load_default(size=size)
    line_h = int(size * 1.35)
    band = line_h * len(lines) + size // 2
    canvas = Image.new("L", (img.width, img.height + band), color=0)
    canvas.paste(img, (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        draw.text((size // 2, size // 4 + i * line_h), text, fill=255, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's PatientOrientation when it is two valid biped directions, else None."""
    value = source.get("PatientOrientation")
    if value and len(value) == 2 and all(str(v) in _ORIENTATION for v in value):
        return str(value[0]), str(value[1])
    return None


def build_sc(
    source: Dataset, display: np.ndarray, finding: Finding, manifest: Manifest, index: int
) -> hd.sc.SCImage:
    """A Secondary Capture in the source's study (patient/study modules copied), new series, derived UIDs."""
    study_uid = str(source.StudyInstanceUID)
    mid, version = manifest.model_id, manifest.model_version
    pixels = render(display, caption(finding, manifest))
    sides = orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        # Header only (the pixels are the rendered capture), Type 2 values and names it accepts.
        ref_dataset=for_highdicom(source, pixels=False),
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_uid("sc-series", study_uid, mid, version),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(
            "sc", study_uid, mid, version, finding.sop_instance_uid, str(finding.frame_index)
        ),
        instance_number=index + 1,
        manufacturer=MANUFACTURER,
        # highdicom insists on an orientation for PATIENT images; a source without one gets an empty value
        # below, which is what Type 2C allows, rather than an invented direction.
        patient_orientation=sides or ("L", "F"),
        series_description=SERIES_DESCRIPTION,
    )
    restore_source(sc, source)
    # Type 2C in General Series for paired body parts: the source's side when it states one, else empty
    # (unknown), rather than leaving validators to guess whether the part is paired.
    side = str(source.get("Laterality", "") or "")
    sc.Laterality = side if side in ("R", "L") else ""
    if sides is None:
        sc["PatientOrientation"].value = None
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    sc.DerivationDescription = f"{mid} {version} result burnt into the source image"[:1024]
    sc.SourceImageSequence = [source_reference(finding)]
    return sc


def source_reference(finding: Finding) -> Dataset:
    """The Source Image Sequence item of a capture: the analysed instance (and frame)."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = finding.sop_class_uid
    ref.ReferencedSOPInstanceUID = finding.sop_instance_uid
    if finding.number_of_frames > 1:
        ref.ReferencedFrameNumber = finding.frame_index + 1
    return ref
