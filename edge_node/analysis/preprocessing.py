"""Manifest preprocessing: one DICOM instance becomes the model input, step by step as the bundle says."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, convert_color_space, get_decoder
from pydicom.pixels.processing import apply_voi
from pydicom.pixels.utils import as_pixel_options

from edge_node.protocol.manifest import Preprocessing

__all__ = [
    "Prepared",
    "SkipReason",
    "apply_modality",
    "apply_voi_rules",
    "check_dimensions",
    "check_modality_value",
    "decode_frame",
    "frame_attributes",
    "invert_monochrome1",
    "normalise",
    "number_of_frames",
    "preprocess",
    "resize",
    "resize_area",
    "resize_bilinear",
    "select_frame",
    "to_grey",
    "window_linear",
]

logger = logging.getLogger(__name__)

#: ITU-R BT.601 luma weights (R, G, B).
BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})


class SkipReason(Exception):
    """An instance the model cannot analyse; ``reason`` is PHI-free and shown to the clinic as is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Prepared:
    """The model input for one instance and the display image it came from."""

    tensor: np.ndarray  # (C, H, W) float32, normalised
    display: np.ndarray  # (rows, cols) float64 in [0, 1], after VOI/inversion/grey, before resize
    frame_index: int  # 0-based frame that was used


# -- 1. modality filter -------------------------------------------------------------------------------------


def check_modality_value(value: str, pre: Preprocessing, model_id: str) -> None:
    """Refuse a Modality value (compared case-insensitively) the model does not accept."""
    modality = value.strip().upper()
    accepted = [m.upper() for m in pre.modalities]
    if modality not in accepted:
        shown = modality or "(none)"
        raise SkipReason(
            f"modality {shown} not accepted by model {model_id} (accepts {', '.join(pre.modalities)})"
        )


#: Decoded pixels one frame may have (rows x columns x samples), checked from the header before decoding.
#: Preprocessing holds a few float64 copies of a frame (~26 bytes a pixel at its peak), so 32 Mpx (a 5,600²
#: radiograph; mammograms are ~20 Mpx) bounds one frame's analysis to ~0.85 GB, whatever the file's size:
#: a 1 MB RLE or JPEG file can claim 8192² or more.
MAX_FRAME_PIXELS = 32 * 1024 * 1024


def check_dimensions(ds: Dataset, pre: Preprocessing, *, max_frame_pixels: int = MAX_FRAME_PIXELS) -> None:
    """Refuse missing pixel data, absurd sizes and frames over the pixel budget before anything is decoded."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SkipReason("no pixel data")
    if "PixelData" not in ds:
        raise SkipReason("float pixel data is not supported")
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1 or rows > pre.max_dimension or cols > pre.max_dimension:
        raise SkipReason(f"absurd dimensions {rows}x{cols} (limit {pre.max_dimension})")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp not in (1, 3):
        raise SkipReason(f"unsupported samples per pixel {spp}")
    frames = number_of_frames(ds)
    if frames < 1:
        raise SkipReason(f"absurd number of frames {frames}")
    if rows * cols * spp > max_frame_pixels:
        raise SkipReason(
            f"frame of {rows}x{cols}x{spp} exceeds the decoding budget of {max_frame_pixels} pixels"
        )
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if bits not in (1, 8, 16, 32, 64):
        raise SkipReason(f"unsupported bits allocated {bits}")


# -- 2. frames ----------------------------------------------------------------------------------------------


def number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        return int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


def select_frame(n_frames: int, rule: str) -> int:
    """The 0-based frame a multi-frame instance contributes: ``middle`` is ``n // 2``, ``first`` is 0."""
    if n_frames < 1:
        raise SkipReason(f"absurd number of frames {n_frames}")
    if rule == "first":
        return 0
    if rule == "middle":
        return n_frames // 2
    raise SkipReason(f"unknown frame rule {rule!r}")


def decode_frame(ds: Dataset, index: int) -> tuple[np.ndarray, str]:
    """Decode one frame: pixels ((rows, cols) or (rows, cols, 3)) and their photometric interpretation.

    Colour comes back as stored (``as_rgb=False``) so that YBR is converted here, explicitly, with
    pydicom's ``convert_color_space``; the decoder reports the interpretation of what it actually returned
    (JPEG 2000 decoders already undo YBR_ICT/RCT).
    """
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        raise SkipReason("pixel data cannot be decoded: no transfer syntax in the file meta")
    name = getattr(tsyntax, "name", str(tsyntax))
    try:
        decoder = get_decoder(tsyntax)
    except RuntimeError as exc:  # pydicom has no decoder at all for this syntax (its error is a RuntimeError)
        raise SkipReason(f"pixel data cannot be decoded: transfer syntax {name}") from exc
    if not decoder.is_available:
        raise SkipReason(f"pixel data cannot be decoded: transfer syntax {name} (no decoder installed)")
    try:
        opts: dict[str, Any] = {**as_pixel_options(ds), "as_rgb": False}
        arr, info = decoder.as_array(ds, index=index, validate=True, **opts)
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError on corrupt data
        logger.info("decode failed (%s): %s", name, type(exc).__name__)
        raise SkipReason(f"pixel data cannot be decoded: transfer syntax {name}") from exc
    photometric = str(info.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    arr = np.asarray(arr)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr.astype(np.uint8, copy=False), photometric, "RGB")
        photometric = "RGB"
    return arr, photometric


def frame_attributes(ds: Dataset, index: int) -> Dataset:
    """The modality-LUT and VOI attributes that apply to one frame.

    Classic images carry them at the top level; enhanced multi-frame images carry them in the shared or
    per-frame functional groups (Pixel Value Transformation, Frame VOI LUT), per-frame winning.
    """
    out = Dataset()
    for keyword in (
        "RescaleSlope",
        "RescaleIntercept",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
        "BitsStored",
        "PixelRepresentation",
    ):
        if keyword in ds:
            out[keyword] = ds[keyword]
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    groups: list[Dataset] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for seq_name in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            seq = group.get(seq_name)
            if not seq:
                continue
            for elem in seq[0]:
                if elem.keyword in (
                    "RescaleSlope",
                    "RescaleIntercept",
                    "WindowCenter",
                    "WindowWidth",
                    "VOILUTFunction",
                ):
                    out[elem.keyword] = elem
    return out


# -- 3. modality LUT ----------------------------------------------------------------------------------------


def apply_modality(pixels: np.ndarray, attrs: Dataset) -> np.ndarray:
    """Modality LUT or Rescale Slope/Intercept (pydicom's ``apply_modality_lut``), as float64.

    SkipReason when a value comes out NaN or infinite (a legal DS such as "1e999" or "NaN"): later clipping
    would turn it into a plausible but meaningless image.
    """
    values = np.asarray(apply_modality_lut(pixels, attrs), dtype=np.float64)
    if not np.isfinite(values).all():
        raise SkipReason("rescale slope or intercept gives values that are not finite")
    return values


def _stored_range(attrs: Dataset) -> tuple[float, float]:
    bits = int(attrs.get("BitsStored", 8) or 8)
    if int(attrs.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


# -- 4. VOI -------------------------------------------------------------------------------------------------


def window_linear(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A DICOM window (PS3.3 C.11.2.1.2) whose output range is [0, 1].

    LINEAR:        y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1];
    LINEAR_EXACT:  y = (x - c) / w + 0.5, clipped;
    SIGMOID:       y = 1 / (1 + exp(-4 (x - c) / w)).
    """
    x = np.asarray(x, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise SkipReason(f"invalid window width {width:g}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise SkipReason(f"invalid window width {width:g}")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise SkipReason(f"invalid window width {width:g}")
    if width == 1:
        # A one-wide LINEAR window is a threshold at c - 0.5.
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value: object) -> float:
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, str)):
        seq = list(value)  # type: ignore[call-overload]
        return float(seq[0])
    return float(value)  # type: ignore[arg-type]


def _header_window(values: np.ndarray, attrs: Dataset) -> np.ndarray | None:
    """WindowCenter/Width (first pair), else the first VOI LUT; None when the header has neither."""
    if "WindowCenter" in attrs and "WindowWidth" in attrs and attrs.WindowCenter not in (None, ""):
        center = _first(attrs.WindowCenter)
        width = _first(attrs.WindowWidth)
        function = str(attrs.get("VOILUTFunction", "LINEAR") or "LINEAR")
        return window_linear(values, center, width, function)
    voi_seq = attrs.get("VOILUTSequence")
    if voi_seq:
        item = voi_seq[0]
        depth = int(item.LUTDescriptor[2])
        # The VOI LUT is indexed by the modality-LUT output, which must be integral here.
        lut_in = np.rint(values).astype(np.int64)
        mapped = np.asarray(apply_voi(lut_in, attrs), dtype=np.float64)
        top = float(2**depth - 1)
        return np.clip(mapped / top, 0.0, 1.0)
    return None


def apply_voi_rules(values: np.ndarray, attrs: Dataset, pre: Preprocessing, *, rescaled: bool) -> np.ndarray:
    """Map values to [0, 1] with the first VOI rule of the manifest that applies.

    ``values`` are the modality-LUT output when ``rescaled`` (else the stored values). ``bit_depth`` maps the
    stored range (from BitsStored and PixelRepresentation, passed through the same rescale) onto [0, 1].
    """
    for rule in pre.voi:
        if rule == "header_window":
            result = _header_window(values, attrs)
            if result is not None:
                return result
        elif rule == "bit_depth":
            lo, hi = _stored_range(attrs)
            if rescaled and "ModalityLUTSequence" not in attrs:
                slope = float(attrs.get("RescaleSlope", 1.0) or 1.0)
                intercept = float(attrs.get("RescaleIntercept", 0.0) or 0.0)
                lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
            elif rescaled:
                depth = int(attrs.ModalityLUTSequence[0].LUTDescriptor[2])
                lo, hi = 0.0, float(2**depth - 1)
            return np.clip((values - lo) / (hi - lo), 0.0, 1.0)
        elif rule == "min_max":
            lo_v, hi_v = float(np.min(values)), float(np.max(values))
            if hi_v <= lo_v:
                return np.zeros_like(values, dtype=np.float64)
            return (values - lo_v) / (hi_v - lo_v)
        elif rule == "fixed" and pre.fixed_window is not None:
            center, width = pre.fixed_window
            return window_linear(values, center, width, "LINEAR")
    raise SkipReason(f"no VOI rule of the model applies (rules: {', '.join(pre.voi)})")


# -- 5./6. photometric --------------------------------------------------------------------------------------


def invert_monochrome1(x: np.ndarray, photometric: str, pre: Preprocessing) -> np.ndarray:
    """MONOCHROME1 stores bright as low values; flip it so bright means dense as in MONOCHROME2."""
    if photometric == "MONOCHROME1" and pre.invert_monochrome1:
        return 1.0 - x
    return x


def to_grey(x: np.ndarray, photometric: str, pre: Preprocessing) -> np.ndarray:
    """Colour (already RGB) becomes one channel with BT.601 luminance weights, or is refused."""
    if x.ndim == 2:
        return x
    if pre.color == "reject":
        raise SkipReason(f"colour images ({photometric}) are not accepted by this model")
    return np.asarray(x[..., :3] @ BT601, dtype=np.float64)


# -- 7. resize ----------------------------------------------------------------------------------------------


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix: each output cell averages the input cells it covers, weighted by overlap."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1, dtype=np.float64) * scale
    lo = edges[:-1, None]
    hi = edges[1:, None]
    cells = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1.0) - np.maximum(lo, cells), 0.0, None)
    return overlap / scale


def resize_area(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-averaging resize of a (H, W) image to ``size`` = (h, w); exact box means for integer factors."""
    h, w = size
    wy = _area_weights(x.shape[0], h)  # (h, H)
    wx = _area_weights(x.shape[1], w)  # (w, W)
    return np.asarray(wy @ np.asarray(x, dtype=np.float64) @ wx.T)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with Pillow on a 32-bit float image."""
    h, w = size
    img = Image.fromarray(np.asarray(x, dtype=np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)


def resize(x: np.ndarray, size: Sequence[int], interpolation: str) -> np.ndarray:
    target = (int(size[0]), int(size[1]))
    if x.shape == target:
        return np.asarray(x, dtype=np.float64)
    if interpolation == "area":
        return resize_area(x, target)
    return resize_bilinear(x, target)


# -- 8. normalise -------------------------------------------------------------------------------------------


def normalise(x: np.ndarray, mean: Sequence[float], std: Sequence[float], channels: int = 1) -> np.ndarray:
    """(C, H, W) float32: the grey image repeated to ``channels``, then (x - mean[c]) / std[c]."""
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise SkipReason(f"manifest mean/std do not match {channels} input channel(s)")
    stack = np.repeat(x[None, :, :], channels, axis=0)  # (C, H, W)
    m = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    return ((stack - m) / s).astype(np.float32)


# -- the whole chain ----------------------------------------------------------------------------------------


def preprocess(
    ds: Dataset,
    pre: Preprocessing,
    *,
    channels: int = 1,
    frame: int | None = None,
) -> Prepared:
    """Run manifest steps 2-8 on one instance; raises SkipReason with a PHI-free reason when it cannot.

    Step 1, the modality filter, is applied to the study's rows before any file is read
    (``edge_node.analysis.selection.row_reason``), so it is not repeated here.
    """
    check_dimensions(ds, pre)
    n_frames = number_of_frames(ds)
    index = select_frame(n_frames, pre.frame_rule) if frame is None else frame
    if not 0 <= index < n_frames:
        raise SkipReason(f"frame {index + 1} does not exist ({n_frames} frames)")
    pixels, photometric = decode_frame(ds, index)
    attrs = frame_attributes(ds, index)
    if pixels.ndim == 3 and photometric in _GREY:
        raise SkipReason(f"pixel data shape {pixels.shape} does not fit {photometric}")
    if photometric not in _GREY and photometric not in _COLOUR:
        raise SkipReason(f"photometric interpretation {photometric or '(none)'} is not supported")
    if pixels.ndim == 2 and pre.apply_modality_lut:
        values = apply_modality(pixels, attrs)
        rescaled = True
    else:
        values = pixels.astype(np.float64)
        rescaled = False
    unit = apply_voi_rules(values, attrs, pre, rescaled=rescaled)
    unit = invert_monochrome1(unit, photometric, pre)
    grey = to_grey(unit, photometric, pre)
    small = resize(grey, pre.size, pre.interpolation)
    tensor = normalise(small, pre.mean, pre.std, channels)
    if not (np.isfinite(tensor).all() and np.isfinite(grey).all()):
        # A NaN or infinite rescale or window (legal DS text such as "NaN" or "1e999") poisons every value;
        # the model's answer would be NaN, and a NaN score never leaves the node.
        raise SkipReason("pixel values are not finite after rescale and windowing")
    return Prepared(tensor=tensor, display=grey, frame_index=index)
