"""analyze_study end to end on files: real DICOM samples, a real ONNX Runtime session, SR/SC written."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from edge_node.analysis.analyzer import StudyOutcome, analyze_study
from edge_node.analysis.preprocessing import preprocess
from edge_node.errors import InferenceError
from edge_node.inference.backend import Backend
from edge_node.inference.loaded_model import LoadedModel, load_model
from tests.edge_node.conftest import instance_rows
from tests.support.onnxgen import ToyBundle, make_bundle

CR_DIR = Path("pydicom_testfiles/dicomdirtests/77654033")


@pytest.fixture
def bundle(tmp_path: Path) -> ToyBundle:
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def model(bundle: ToyBundle) -> LoadedModel:
    return load_model(bundle, ["CPUExecutionProvider"], threads=1)


@pytest.fixture
def cr_study(shared_data: Path) -> list[Path]:
    root = shared_data / "dicom" / CR_DIR
    return [root / "CR1" / "6154", root / "CR2" / "6247", root / "CR3" / "6278"]


def _analyse(
    paths: list[Path], model: LoadedModel, out: Path, *, secondary_capture: bool = True
) -> StudyOutcome:
    return analyze_study(instance_rows(paths), model, out, secondary_capture=secondary_capture)


@pytest.fixture
def ct_study(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "dicom" / CR_DIR / "CT2").iterdir())


def test_cr_study_is_analysed_and_scores_match_the_model(
    tmp_path: Path, cr_study: list[Path], bundle: ToyBundle, model: LoadedModel
) -> None:
    out = _analyse(cr_study, model, tmp_path / "out")
    assert out.status == "done" and out.reason is None and out.ignored == []
    # Independent recomputation: manifest preprocessing, then the linear model in numpy, then the sigmoid.
    tensors = np.stack(
        [preprocess(pydicom.dcmread(p), bundle.manifest.preprocessing).tensor for p in cr_study]
    )
    expected = 1 / (1 + np.exp(-bundle.model.logits(tensors)[:, 0]))
    by_uid = {f.sop_instance_uid: f for f in out.findings}
    for path, score in zip(cr_study, expected, strict=True):
        finding = by_uid[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
        assert finding.score == pytest.approx(score, abs=1e-6)
        assert finding.present == (finding.score >= 0.5)
        assert finding.label == ("pneumonia" if finding.present else "normal")
    kinds = sorted(f.path.name.split("-")[0] for f in out.outputs)
    assert kinds == ["sc", "sc", "sc", "sr"]
    assert all(f.path.parent == tmp_path / "out" and f.path.is_file() for f in out.outputs)
    sr_path = next(f.path for f in out.outputs if f.path.name.startswith("sr-"))
    report = hd.sr.srread(sr_path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    sr_scores = sorted(g.get_measurements()[0].value for g in groups)
    assert sr_scores == pytest.approx(sorted(f.score for f in out.findings), abs=1e-12)


def test_ct_study_is_skipped_with_the_reason(
    tmp_path: Path, ct_study: list[Path], model: LoadedModel
) -> None:
    out = _analyse(ct_study, model, tmp_path / "out")
    assert out.status == "skipped"
    assert out.reason == "modality CT not accepted by model test-student (accepts CR, DX) (4 instances)"
    assert out.findings == [] and out.outputs == []
    assert not (tmp_path / "out").exists()


def test_mixed_study_analyses_what_it_can(
    tmp_path: Path, cr_study: list[Path], ct_study: list[Path], model: LoadedModel
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 300)
    first = _analyse(cr_study[:1], model, tmp_path / "first")
    own_sr = next(f.path for f in first.outputs if f.path.name.startswith("sr-"))
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(cr_study[1])
    ds.PixelData = ds.PixelData[:20]
    ds.save_as(broken)
    out = _analyse([cr_study[0], ct_study[0], junk, own_sr, broken], model, tmp_path / "out")
    assert out.status == "done" and len(out.findings) == 1
    reasons = sorted(i.reason for i in out.ignored)
    assert reasons == [
        "Comprehensive SR Storage is a structured report, not an image",
        "modality CT not accepted by model test-student (accepts CR, DX)",
        "not a readable DICOM file",
        "pixel data cannot be decoded: transfer syntax Explicit VR Little Endian",
    ]


def test_secondary_capture_is_optional(tmp_path: Path, cr_study: list[Path], model: LoadedModel) -> None:
    out = _analyse(cr_study, model, tmp_path / "out", secondary_capture=False)
    assert [f.path.name.split("-")[0] for f in out.outputs] == ["sr"]


def test_rerun_writes_the_same_result_files(tmp_path: Path, cr_study: list[Path], model: LoadedModel) -> None:
    a = _analyse(cr_study, model, tmp_path / "a")
    b = _analyse(cr_study, model, tmp_path / "b")
    assert sorted(f.path.name for f in a.outputs) == sorted(f.path.name for f in b.outputs)


def test_nothing_to_analyse(tmp_path: Path, model: LoadedModel) -> None:
    assert analyze_study([], model, tmp_path).reason == "the study has no instances"
    junk = tmp_path / "a.dcm"
    junk.write_text("hello")
    shutil.copy(junk, tmp_path / "b.dcm")
    out = _analyse([junk, tmp_path / "b.dcm"], model, tmp_path / "out")
    assert (out.status, out.reason) == ("skipped", "not a readable DICOM file (2 instances)")


class _BrokenBackend(Backend):
    @property
    def provider(self) -> str:
        return "CPUExecutionProvider"

    @property
    def input_dtype(self) -> type[np.generic]:
        return np.float32

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT")


def test_a_failing_model_is_an_inference_error(
    tmp_path: Path, cr_study: list[Path], model: LoadedModel
) -> None:
    broken = LoadedModel(
        manifest=model.manifest, backend=_BrokenBackend(), model_file="model.onnx", precision="fp32"
    )
    with pytest.raises(InferenceError, match=r"model test-student 1\.2\.3 failed on 3 image"):
        _analyse(cr_study, broken, tmp_path / "out")


def test_bad_instances_are_skipped_with_reasons_and_the_good_ones_get_results(
    tmp_path: Path, cr_study: list[Path], model: LoadedModel
) -> None:
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    good = cr_study[0]
    made: dict[str, Path] = {}

    def nan_window(ds: pydicom.Dataset) -> None:
        ds.WindowCenter = "NaN"
        ds.WindowWidth = "NaN"

    with pydicom.config.disable_value_validation():  # written as a broken sender would, unchecked
        for name, change in {
            "zero-frames": lambda ds: setattr(ds, "NumberOfFrames", 0),
            "nan-window": nan_window,
            "inf-slope": lambda ds: setattr(ds, "RescaleSlope", "1e999"),
        }.items():
            ds = pydicom.dcmread(good)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.SeriesInstanceUID = pydicom.uid.generate_uid()
            change(ds)
            made[name] = bad_dir / f"{name}.dcm"
            ds.save_as(made[name], enforce_file_format=True)
    # Sequences nested far deeper than the recursion limit: pydicom raises RecursionError reading it.
    deep = pydicom.dcmread(good)
    deep.SOPInstanceUID = deep.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    item = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    end = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    made["deep"] = bad_dir / "deep.dcm"
    made["deep"].write_bytes(good.read_bytes()[:132] + _meta_and_deep(deep, item * 3000 + end * 3000))
    out = _analyse(cr_study + list(made.values()), model, tmp_path / "out")
    assert out.status == "done"
    analysed = {f.sop_instance_uid for f in out.findings}
    assert analysed == {str(pydicom.dcmread(p).SOPInstanceUID) for p in cr_study}
    assert all(np.isfinite(f.score) for f in out.findings)
    reasons = {i.path.name: i.reason for i in out.ignored}
    assert set(reasons) == {p.name for p in made.values()}
    assert "frames" in reasons["zero-frames.dcm"]
    assert "not finite" in reasons["nan-window.dcm"] and "not finite" in reasons["inf-slope.dcm"], reasons
    assert reasons["deep.dcm"] == "not a readable DICOM file"
    for result in out.outputs:
        text = str(pydicom.dcmread(result.path))
        assert "nan" not in text.lower().replace("nanometer", "")


def _meta_and_deep(ds: pydicom.Dataset, nested: bytes) -> bytes:
    """File meta and data set of ``ds`` (explicit VR LE) with ``nested`` bytes inserted before (0008,1140)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    before, after = pydicom.Dataset(), pydicom.Dataset()
    for elem in ds:
        (before if elem.tag < 0x00081140 else after).add(elem)
    out = DicomBytesIO()
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    for part, extra in ((before, nested), (after, b"")):
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, part)
        out.write(buf.getvalue() + extra)
    return bytes(out.getvalue())
