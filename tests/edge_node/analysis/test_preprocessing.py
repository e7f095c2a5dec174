"""Manifest preprocessing on the real DICOM samples and on constructed cases with exact expected numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from edge_node.analysis.preprocessing import (
    SkipReason,
    apply_voi_rules,
    check_modality_value,
    decode_frame,
    frame_attributes,
    normalise,
    preprocess,
    resize_area,
    resize_bilinear,
    select_frame,
    window_linear,
)
from edge_node.protocol.manifest import Preprocessing

ALL_MODALITIES = ["CR", "DX", "CT", "MR", "US", "NM", "SEG", "OT"]


def _pre(**kw: object) -> Preprocessing:
    base: dict[str, object] = {"modalities": ALL_MODALITIES, "size": (28, 28), "mean": [0.5], "std": [0.5]}
    base.update(kw)
    return Preprocessing.model_validate(base)


def _image(
    pixels: np.ndarray, *, modality: str = "CR", photometric: str = "MONOCHROME2", **attrs: object
) -> Dataset:
    """A minimal uncompressed single-frame instance around ``pixels`` (uint8/uint16/int16)."""
    arr = np.ascontiguousarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3 if arr.ndim == 3 else 1
    if arr.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = arr.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _sample_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "dicom").rglob("*") if p.is_file() and p.name not in ("README.md",))


# -- real samples --------------------------------------------------------------------------------------------


def test_every_sample_decodes_or_is_refused_with_a_reason(shared_data: Path) -> None:
    pre = _pre()
    outcomes: dict[str, str] = {}
    for path in _sample_files(shared_data):
        ds = pydicom.dcmread(path)
        try:
            out = preprocess(ds, pre)
        except SkipReason as skip:
            assert skip.reason, path
            outcomes[path.name] = f"skip: {skip.reason}"
            continue
        assert out.tensor.shape == (1, 28, 28) and out.tensor.dtype == np.float32, path
        assert np.isfinite(out.tensor).all(), path
        assert out.display.min() >= 0.0 and out.display.max() <= 1.0, path
        outcomes[path.name] = "ok"
    # Every compressed syntax in the samples decodes (RLE, JPEG-LS, JPEG 2000, JPEG baseline, extended and
    # lossless, big endian); only the DICOMDIR (not an image) is refused. 12-bit JPEG Extended needs a
    # 12-bit JPEG decoder: the edge extra ships none (GDCM's is disabled by pydicom, libjpeg is GPL), so
    # where none is installed that one sample is refused with its reason.
    refused = {name: why for name, why in outcomes.items() if why != "ok"}
    expected = ["DICOMDIR"]
    if importlib.util.find_spec("libjpeg") is None:
        expected.append("JPGExtended.dcm")
        assert "transfer syntax JPEG Extended" in refused.get("JPGExtended.dcm", ""), refused
    assert sorted(refused) == sorted(expected), refused
    assert len(outcomes) >= 70


def test_lossless_transfer_syntaxes_give_identical_input(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "pydicom_testfiles"
    pre = _pre()
    reference = preprocess(pydicom.dcmread(folder / "MR_small.dcm"), pre).tensor
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ):
        got = preprocess(pydicom.dcmread(folder / name), pre).tensor
        np.testing.assert_array_equal(got, reference, err_msg=name)


def test_monochrome1_dx_image_is_inverted(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "dicom" / "highdicom" / "dx_image.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = ds.pixel_array.astype(np.float64)
    # Header window (128, 256, LINEAR) on stored values (slope 1, intercept 0), then 1 - y.
    windowed = np.clip((stored - 127.5) / 255.0 + 0.5, 0.0, 1.0)
    inverted = preprocess(ds, _pre(size=(169, 211)))
    np.testing.assert_allclose(inverted.display, 1.0 - windowed, atol=1e-12)
    kept = preprocess(ds, _pre(size=(169, 211), invert_monochrome1=False))
    np.testing.assert_allclose(kept.display, windowed, atol=1e-12)
    # Bright bone in the stored MONOCHROME1 data is low: after inversion the brightest display pixel was the
    # darkest stored one.
    assert inverted.display.flat[np.argmin(stored)] == pytest.approx(inverted.display.max())


def test_multiframe_ultrasound_uses_the_middle_frame(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "dicom" / "pydicom_testfiles" / "examples_ybr_color.dcm")
    assert int(ds.NumberOfFrames) == 30 and ds.PhotometricInterpretation == "YBR_FULL_422"
    out = preprocess(ds, _pre(size=(240, 320)))
    assert out.frame_index == 15
    _, photometric = decode_frame(ds, 15)
    assert photometric == "RGB"
    raw = pydicom.pixels.pixel_array(ds, index=15, raw=True)  # still YBR
    rgb = convert_color_space(raw, "YBR_FULL_422", "RGB").astype(np.float64)
    expected = (rgb / 255.0) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out.display, expected, atol=1e-12)
    # Another frame really differs, so the test can tell frames apart.
    first = preprocess(ds, _pre(size=(240, 320), frame_rule="first"))
    assert first.frame_index == 0
    assert np.abs(first.display - out.display).mean() > 1e-3


def test_jpeg2000_colour_becomes_luminance(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "dicom" / "pydicom_testfiles" / "examples_jpeg2k.dcm")
    out = preprocess(ds, _pre(size=(480, 640)))
    rgb = ds.pixel_array.astype(np.float64) / 255.0
    np.testing.assert_allclose(out.display, rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-12)
    with pytest.raises(SkipReason, match="colour images"):
        preprocess(ds, _pre(color="reject"))


def test_ct_rescale_and_header_window_on_real_slice(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "dicom" / "dcmqi_ct3slice" / "01.dcm")
    out = preprocess(ds, _pre(size=(512, 512)))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    np.testing.assert_allclose(out.display, np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-12)


# -- exact numbers on constructed cases ----------------------------------------------------------------------


def test_window_formula_matches_the_standard() -> None:
    c, w = 40.0, 400.0
    lo = c - 0.5 - (w - 1) / 2  # at or below: 0
    hi = c - 0.5 + (w - 1) / 2  # above: 1
    x = np.array([lo - 10, lo, c - 0.5, hi, hi + 10])
    np.testing.assert_allclose(window_linear(x, c, w), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-12)
    assert window_linear(np.array([100.0]), c, w)[0] == pytest.approx((100 - 39.5) / 399 + 0.5)
    assert window_linear(np.array([140.0]), c, w, "LINEAR_EXACT")[0] == pytest.approx(100 / 400 + 0.5)
    assert window_linear(np.array([c]), c, w, "SIGMOID")[0] == pytest.approx(0.5)
    assert window_linear(np.array([c + w]), c, w, "SIGMOID")[0] == pytest.approx(1 / (1 + np.exp(-4.0)))
    # The MedMNIST wrapping window (128, 256) maps 0..255 onto x / 255 exactly.
    v = np.arange(256, dtype=np.float64)
    np.testing.assert_allclose(window_linear(v, 128, 256), v / 255.0, atol=1e-15)
    with pytest.raises(SkipReason, match="invalid window width"):
        window_linear(v, 128, 0)


def test_rescale_then_window_on_signed_pixels() -> None:
    stored = np.array([[-100, 0], [500, 2000]], dtype=np.int16)
    ds = _image(
        stored, modality="CT", RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=1000
    )
    out = preprocess(ds, _pre(size=(2, 2)))
    hu = stored.astype(np.float64) * 2 - 1024  # [-1224, -1024], [-24, 2976]
    expected = np.clip((hu + 0.5) / 999 + 0.5, 0, 1)
    np.testing.assert_allclose(out.display, expected, atol=1e-12)
    np.testing.assert_allclose(out.tensor[0], (expected - 0.5) / 0.5, atol=1e-6)


def test_bit_depth_rule_uses_bits_stored_through_the_rescale() -> None:
    stored = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)
    ds = _image(stored, BitsStored=12, HighBit=11)
    out = preprocess(ds, _pre(size=(2, 2), voi=["header_window", "bit_depth"]))
    np.testing.assert_allclose(out.display, stored / 4095.0, atol=1e-12)
    rescaled = _image(stored, BitsStored=12, HighBit=11, RescaleSlope=0.5, RescaleIntercept=100)
    attrs = frame_attributes(rescaled, 0)
    values = stored * 0.5 + 100
    got = apply_voi_rules(values, attrs, _pre(voi=["bit_depth"]), rescaled=True)
    np.testing.assert_allclose(got, stored / 4095.0, atol=1e-12)


def test_voi_rules_apply_in_manifest_order() -> None:
    stored = np.array([[10, 20], [30, 50]], dtype=np.uint16)
    windowed = _image(stored, WindowCenter=30, WindowWidth=41)
    plain = _image(stored)
    # header_window first: the header window wins when present...
    out = preprocess(windowed, _pre(size=(2, 2), voi=["header_window", "min_max"]))
    np.testing.assert_allclose(out.display, np.clip((stored - 29.5) / 40 + 0.5, 0, 1), atol=1e-12)
    # ...and the next rule applies when it is absent.
    out = preprocess(plain, _pre(size=(2, 2), voi=["header_window", "min_max"]))
    np.testing.assert_allclose(out.display, (stored - 10) / 40.0, atol=1e-12)
    # min_max listed first ignores the header window.
    out = preprocess(windowed, _pre(size=(2, 2), voi=["min_max", "header_window"]))
    np.testing.assert_allclose(out.display, (stored - 10) / 40.0, atol=1e-12)
    out = preprocess(plain, _pre(size=(2, 2), voi=["fixed"], fixed_window=(20.0, 21.0)))
    np.testing.assert_allclose(out.display, np.clip((stored - 19.5) / 20 + 0.5, 0, 1), atol=1e-12)
    with pytest.raises(SkipReason, match="no VOI rule"):
        preprocess(plain, _pre(size=(2, 2), voi=["header_window"]))


def test_voi_lut_sequence_in_the_header() -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    ds = _image(stored)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 51, 204, 255]
    ds.VOILUTSequence = [item]
    out = preprocess(ds, _pre(size=(2, 2)))
    np.testing.assert_allclose(out.display, np.array([[0, 51], [204, 255]]) / 255.0, atol=1e-12)


def test_area_resize_is_exact_box_averaging() -> None:
    x = np.arange(16, dtype=np.float64).reshape(4, 4)
    np.testing.assert_allclose(resize_area(x, (2, 2)), [[2.5, 4.5], [10.5, 12.5]])
    # 3 → 2: each output cell covers 1.5 input cells (weights 1 and 0.5 along each axis).
    y = np.arange(9, dtype=np.float64).reshape(3, 3)
    top_left = (y[0, 0] + 0.5 * y[0, 1] + 0.5 * y[1, 0] + 0.25 * y[1, 1]) / 2.25
    assert resize_area(y, (2, 2))[0, 0] == pytest.approx(top_left)
    rng = np.random.default_rng(1)
    z = rng.random((61, 47))
    assert resize_area(z, (28, 28)).mean() == pytest.approx(z.mean())
    np.testing.assert_allclose(resize_area(z, (61, 47)), z)


def test_bilinear_resize_keeps_constant_images_and_shape() -> None:
    flat = np.full((50, 40), 0.25)
    out = resize_bilinear(flat, (28, 20))
    assert out.shape == (28, 20)
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


def test_normalise_per_channel() -> None:
    x = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(normalise(x, [0.5], [0.25]), [[[-2.0, 2.0]]])
    three = normalise(x, [0.0, 0.5, 1.0], [1.0, 1.0, 2.0], channels=3)
    np.testing.assert_allclose(three, [[[0.0, 1.0]], [[-0.5, 0.5]], [[-0.5, 0.0]]])
    with pytest.raises(SkipReason):
        normalise(x, [0.1, 0.2], [1.0, 1.0], channels=3)


# -- refusals ------------------------------------------------------------------------------------------------


def test_wrong_modality_is_refused_with_the_accepted_list() -> None:
    pre = Preprocessing(modalities=["CR", "DX"], size=(28, 28), mean=[0.5], std=[0.5])
    with pytest.raises(SkipReason) as info:
        check_modality_value("CT", pre, "pneumonia-student")
    assert info.value.reason == "modality CT not accepted by model pneumonia-student (accepts CR, DX)"
    check_modality_value("DX", pre, "m")
    check_modality_value(" dx", pre, "m")  # compared case-insensitively, padding ignored


def test_absurd_dimensions_are_refused_before_decoding() -> None:
    ds = _image(np.zeros((2, 2), np.uint8))
    ds.Rows, ds.Columns = 60000, 3  # Rows is US: at most 65535
    with pytest.raises(SkipReason, match=r"absurd dimensions 60000x3 \(limit 16384\)"):
        preprocess(ds, _pre())


def test_no_pixel_data_is_refused() -> None:
    ds = _image(np.zeros((2, 2), np.uint8))
    del ds.PixelData
    with pytest.raises(SkipReason, match=r"^no pixel data$"):
        preprocess(ds, _pre())


def test_unsupported_transfer_syntax_is_refused_with_its_name() -> None:
    ds = _image(np.zeros((2, 2), np.uint8))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder
    with pytest.raises(SkipReason, match="pixel data cannot be decoded: transfer syntax MPEG2"):
        preprocess(ds, _pre())


def test_corrupt_compressed_pixels_are_refused(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "dicom" / "pydicom_testfiles" / "MR_small_jp2klossless.dcm")
    ds.PixelData = ds.PixelData[:40]  # truncated codestream
    with pytest.raises(SkipReason, match="pixel data cannot be decoded: transfer syntax JPEG 2000"):
        preprocess(ds, _pre())


def test_short_uncompressed_pixel_data_is_refused() -> None:
    ds = _image(np.zeros((4, 4), np.uint16))
    ds.PixelData = ds.PixelData[:10]
    with pytest.raises(SkipReason, match="pixel data cannot be decoded"):
        preprocess(ds, _pre())


def test_frame_rules() -> None:
    assert select_frame(30, "middle") == 15
    assert select_frame(1, "middle") == 0
    assert select_frame(2, "middle") == 1
    assert select_frame(30, "first") == 0
    with pytest.raises(SkipReason):
        select_frame(0, "middle")


@pytest.mark.parametrize(
    ("name", "plugins"),
    [
        ("pydicom_data/JPGLosslessP14SV1_1s_1f_8b.dcm", ("gdcm",)),
        ("pydicom_testfiles/MR_small_jpeg_ls_lossless.dcm", ("gdcm", "pyjpegls")),
        ("pydicom_testfiles/examples_ybr_color.dcm", ("gdcm", "pillow")),
    ],
)
def test_jpeg_decodes_with_permissively_licensed_decoders(
    shared_data: Path, name: str, plugins: tuple[str, ...]
) -> None:
    """JPEG lossless, JPEG-LS and baseline decode with GDCM / CharLS / Pillow, without GPL libjpeg."""
    ds = pydicom.dcmread(shared_data / "dicom" / name)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    # pydicom 3 annotates as_array's **kwargs as DecodeOptions (each value) instead of Unpack[DecodeOptions]
    results = [
        decoder.as_array(ds, index=0, decoding_plugin=p, as_rgb=False)[0]  # type: ignore[arg-type]
        for p in plugins
    ]
    for arr in results[1:]:
        assert np.abs(arr.astype(np.int64) - results[0].astype(np.int64)).max() <= 1  # lossy: rounding only
    if name.endswith("jpeg_ls_lossless.dcm"):
        plain = pydicom.dcmread(shared_data / "dicom" / "pydicom_testfiles" / "MR_small.dcm").pixel_array
        np.testing.assert_array_equal(results[0], plain)
