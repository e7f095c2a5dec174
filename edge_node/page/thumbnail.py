"""A study's thumbnail as PNG: the secondary capture of its latest run, else its spooled source image."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from edge_node.state.database import Database

__all__ = ["THUMBNAIL_SIDE", "study_thumbnail"]

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 256


def _source_paths(db: Database, results_dir: Path, study_id: int) -> list[Path]:
    """Where a picture of the study may be found, best first: SC results, then the analysed instances."""
    runs = db.query(
        "SELECT id FROM runs WHERE study_id = ? AND status = 'done' ORDER BY id DESC LIMIT 1", (study_id,)
    )
    paths: list[Path] = []
    if runs:
        run_id = int(runs[0]["id"])
        paths += sorted((results_dir / f"run-{run_id:08d}").glob("sc-*.dcm"))
        paths += [
            Path(r["path"])
            for r in db.query(
                "SELECT i.path FROM instances i JOIN findings f ON f.sop_instance_uid = i.sop_instance_uid"
                " WHERE f.run_id = ? AND i.study_id = ? ORDER BY f.score DESC",
                (run_id, study_id),
            )
        ]
    paths += [
        Path(r["path"])
        for r in db.query("SELECT path FROM instances WHERE study_id = ? ORDER BY id", (study_id,))
    ]
    return paths


def _display(ds: pydicom.Dataset) -> Image.Image:
    """The middle frame as an 8-bit picture: modality and VOI LUT as the file says, else min-max."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    pixels = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if pixels.ndim == 3:  # colour (rows, cols, 3)
        return Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB")
    values = np.asarray(apply_voi_lut(apply_modality_lut(pixels, ds), ds), dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L")


def study_thumbnail(db: Database, results_dir: Path, study_id: int) -> bytes | None:
    """PNG bytes (longest side THUMBNAIL_SIDE) or None when no picture of the study can be read."""
    for path in _source_paths(db, results_dir, study_id):
        if not path.is_file():
            continue
        try:
            image = _display(pydicom.dcmread(path))
        except Exception as exc:  # a picture is a nicety: any unreadable file means "try the next"
            logger.warning("no thumbnail from a file of study row %d (%s)", study_id, type(exc).__name__)
            continue
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
        if image.width < 96:  # MedMNIST is 28 px: enlarge so a clinician can see it
            factor = max(1, 128 // image.width)
            image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
    return None
