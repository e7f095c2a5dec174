"""The fast SR and SC equal highdicom's own construction, and every SR and SC the node builds passes dciodvfy.

Real inputs: every DICOM image in the shared data that highdicom takes as SR evidence, studies made by
``fedclinic-hub data dicomize``, minimal (Type 1 only) CR and DX headers, odd but legal names under UTF-8;
binary and multiclass toy bundles, and the real test bundle, whose input envelope adds an item per group.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_node.analysis.capture_sc import build_sc, caption
from edge_node.analysis.capture_template import fast_sc
from edge_node.analysis.findings import AnalysedImage, Finding, findings_from_probabilities
from edge_node.analysis.report_sr import build_sr
from edge_node.analysis.report_template import ReportTemplate, fast_sr
from edge_node.analysis.result_file import save_result
from edge_node.analysis.source_view import DEIDENTIFICATION_NOT_STATED
from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.manifest import ClassLabel, Manifest, TaskSpec
from edge_node.protocol.signing import load_public_keys
from edge_node.state.runs import ReportRef
from tests.edge_node.conftest import find_test_bundle
from tests.support.onnxgen import make_bundle

pytestmark = pytest.mark.slow

#: Set by the clock, not by the inputs: the only elements allowed to differ.
TIMES = frozenset(
    {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "ContributionDateTime",
        "DateOfSecondaryCapture",
        "TimeOfSecondaryCapture",
    }
)
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    """Every element that is missing on one side or differs in VR or value (times left out), recursively."""
    out: list[str] = []
    tags_a, tags_b = set(a.keys()), set(b.keys())
    for tag in sorted(tags_a | tags_b):
        if tag not in tags_a or tag not in tags_b:
            side = "fast" if tag in tags_a else "highdicom"
            out.append(f"{path}{tag} only in {side}")
            continue
        ea, eb = a[tag], b[tag]
        if ea.keyword in TIMES:
            continue
        if ea.VR != eb.VR:
            out.append(f"{path}{ea.keyword}: VR {ea.VR} != {eb.VR}")
        elif ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{path}{ea.keyword}: {len(ea.value)} != {len(eb.value)} items")
                continue
            for i, (x, y) in enumerate(zip(ea.value, eb.value, strict=True)):
                out.extend(differences(x, y, f"{path}{ea.keyword}[{i}]."))
        elif ea.value != eb.value:
            out.append(f"{path}{ea.keyword}: {ea.value!r} != {eb.value!r}")
    return out


def _written(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _finding(ds: Dataset, manifest: Manifest, *, present: bool, score: float, frame: int = 0) -> Finding:
    classes = manifest.task.classes
    return Finding(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        score=score,
        label=classes[1 if present else 0].name,
        present=present,
        frame_index=frame,
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


def _minimal(study_uid: str, sop_class: str, modality: str) -> Dataset:
    """A header with only the Type 1 elements of a CR/DX image: no patient, no study attributes."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality = modality
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _odd_names() -> Dataset:
    ds = _minimal(generate_uid(), CR_IMAGE, "CR")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID = "Ñúñez-O'Brien^Zoë Ågot^^Dr.^", "ID 0/7-ÄÖ*?#"
    ds.ReferringPhysicianName, ds.AccessionNumber, ds.StudyID = "山田^太郎", "A&B#12", "S#1 (x)"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19700101", "O", "20260102", "0930"
    return ds


def _real_images(shared_data: Path) -> Iterator[tuple[str, Dataset]]:
    """Every image header in the shared DICOM data (files pydicom cannot read left out)."""
    for path in sorted(p for p in (shared_data / "dicom").rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "Rows" in ds and "StudyInstanceUID" in ds and "SOPClassUID" in ds:
            yield str(path.relative_to(shared_data)), ds


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return make_bundle(tmp_path_factory.mktemp("binary")).manifest


@pytest.fixture(scope="module")
def dicomized(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> list[Dataset]:
    from hub.data.dicomize import dicomize_images
    from hub.data.medmnist import load_medmnist

    images = load_medmnist("pneumoniamnist", "test", root=shared_data).images
    made = dicomize_images(
        images, tmp_path_factory.mktemp("cr"), dataset="pneumoniamnist", split="test", indices=range(3)
    )
    return [pydicom.dcmread(m.path) for m in made]


def _sources(shared_data: Path, dicomized: list[Dataset]) -> list[tuple[str, Dataset]]:
    sources = [(f"dicomize {i}", ds) for i, ds in enumerate(dicomized)]
    sources += list(_real_images(shared_data))
    sources += [("minimal CR", _minimal(generate_uid(), CR_IMAGE, "CR"))]
    sources += [("minimal DX", _minimal(generate_uid(), DX_IMAGE, "DX")), ("odd names", _odd_names())]
    return sources


def test_the_fast_sr_equals_highdicoms_for_real_and_minimal_headers(
    shared_data: Path, dicomized: list[Dataset], binary: Manifest
) -> None:
    compared = 0
    for name, ds in _sources(shared_data, dicomized):
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        for present, score in ((True, 0.8731942415237427), (False, 1e-07)):
            finding = _finding(ds, binary, present=present, score=score, frame=frames - 1)
            reference = build_sr([ds], [finding], binary)
            fast = fast_sr([ds], [finding], binary)
            assert differences(fast, reference) == [], name
            assert differences(fast.file_meta, reference.file_meta) == [], name
            # Written and read back too: the shared elements are written pre-encoded.
            assert differences(_written(fast), _written(reference)) == [], name
            compared += 1
    assert compared >= 2 * 80  # the shared data holds 87 images


def test_the_fast_sc_equals_highdicoms_for_real_and_minimal_headers(
    shared_data: Path, dicomized: list[Dataset], binary: Manifest
) -> None:
    compared = 0
    for n, (name, ds) in enumerate(_sources(shared_data, dicomized)):
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        finding = _finding(ds, binary, present=n % 2 == 0, score=0.31 + n / 1000, frame=frames - 1)
        display = np.linspace(0, 1, 40 * 30).reshape(40, 30)
        reference = build_sc(ds, display, finding, binary, n)
        fast = fast_sc(ds, display, finding, binary, n)
        assert differences(fast, reference) == [], name
        assert differences(fast.file_meta, reference.file_meta) == [], name
        assert differences(_written(fast), _written(reference)) == [], name
        compared += 1
    assert compared >= 80


def test_several_findings_frames_multiclass_and_a_predecessor(shared_data: Path, tmp_path: Path) -> None:
    manifest = make_bundle(tmp_path / "multi", kind="multiclass").manifest
    root = shared_data / "dicom" / "pydicom_testfiles" / "dicomdirtests" / "77654033"
    sources = [
        pydicom.dcmread(root / n, stop_before_pixels=True) for n in ("CR1/6154", "CR2/6247", "CR3/6278")
    ]
    classes = [c.name for c in manifest.task.classes]
    findings = [
        Finding(
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            score=0.2 + 0.3 * i,
            label=classes[i % len(classes)],
            present=True,
            probabilities=(0.1 * i, 0.2, 0.8 - 0.1 * i),
        )
        for i, ds in enumerate(sources)
    ]
    prior = ReportRef(generate_uid(), generate_uid())
    reference = build_sr(sources, findings, manifest, predecessor=prior)
    fast = fast_sr(sources, findings, manifest, predecessor=prior)
    assert differences(fast, reference) == []
    container = [i for i in fast.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    assert len(container[0].ContentSequence) == 3  # one measurement group per finding
    # Each group: the top class as the finding, its score, and every class's probability.
    nums = [i for i in container[0].ContentSequence[1].ContentSequence if i.ValueType == "NUM"]
    assert [i.ConceptNameCodeSequence[0].CodeValue for i in nums] == ["MODELSCORE"] + [
        f"CLASSPROB{k}" for k in range(3)
    ]
    assert [float(i.MeasuredValueSequence[0].FloatingPointValue) for i in nums] == pytest.approx(
        [0.5, 0.1, 0.2, 0.7]
    )
    # A multi-frame source: the frame reference is the analysed frame's.
    mr = pydicom.dcmread(shared_data / "dicom" / "pydicom_data" / "emri_small.dcm", stop_before_pixels=True)
    finding = Finding(
        str(mr.SOPInstanceUID), str(mr.SeriesInstanceUID), str(mr.SOPClassUID), 0.5, classes[2], True, 3, 10,
        (0.25, 0.25, 0.5),
    )  # fmt: skip
    assert differences(fast_sr([mr], [finding], manifest), build_sr([mr], [finding], manifest)) == []


def test_the_template_is_not_changed_by_the_documents_it_makes(shared_data: Path, binary: Manifest) -> None:
    template = ReportTemplate(binary)
    ds = pydicom.dcmread(shared_data / "dicom" / "highdicom" / "dx_image.dcm", stop_before_pixels=True)
    finding = _finding(ds, binary, present=True, score=0.9)
    first = template.build([ds], [finding], now=datetime.datetime(2026, 1, 2, 3, 4, 5))
    _written(first)
    differences(first, build_sr([ds], [finding], binary))  # reads (and decodes) every element of `first`
    other = _minimal(generate_uid(), CR_IMAGE, "CR")
    second = template.build([other], [_finding(other, binary, present=False, score=0.1)])
    assert (
        differences(second, build_sr([other], [_finding(other, binary, present=False, score=0.1)], binary))
        == []
    )
    assert str(first.ContentDate) == "20260102" and str(first.ContentTime) == "030405"


def test_a_result_says_what_its_source_says_about_de_identification(binary: Manifest) -> None:
    removed = _minimal(generate_uid(), CR_IMAGE, "CR")
    removed.PatientIdentityRemoved = "YES"
    finding = _finding(removed, binary, present=True, score=0.7)
    sr = fast_sr([removed], [finding], binary)
    assert sr.PatientIdentityRemoved == "YES" and sr.DeidentificationMethod == DEIDENTIFICATION_NOT_STATED
    removed.DeidentificationMethod = "Basic Application Confidentiality Profile"
    for result in (
        fast_sr([removed], [finding], binary),
        build_sc(removed, np.zeros((8, 8)), finding, binary, 0),
    ):
        assert result.PatientIdentityRemoved == "YES"
        assert result.DeidentificationMethod == "Basic Application Confidentiality Profile"
    plain = _minimal(generate_uid(), CR_IMAGE, "CR")
    sr = fast_sr([plain], [_finding(plain, binary, present=True, score=0.7)], binary)
    assert "PatientIdentityRemoved" not in sr and "DeidentificationMethod" not in sr


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) is not installed")
def test_every_sr_and_sc_passes_dciodvfy(
    shared_data: Path, dicomized: list[Dataset], binary: Manifest, tmp_path: Path
) -> None:
    checked = 0
    for n, (name, ds) in enumerate(_sources(shared_data, dicomized)):
        finding = _finding(ds, binary, present=n % 2 == 0, score=0.25 + n / 100)
        sr = fast_sr([ds], [finding], binary)
        sc = fast_sc(ds, np.linspace(0, 1, 64 * 48).reshape(64, 48), finding, binary, 0)
        sc_path = tmp_path / f"sc-{n}.dcm"
        sc.save_as(sc_path, enforce_file_format=True)
        for kind, path in (("SR", save_result(sr, tmp_path, "sr").path), ("SC", sc_path)):
            assert _dciodvfy_errors(path) == [], f"{kind} of {name}"
            checked += 1
    assert checked >= 2 * 80


def _graded(manifest: Manifest) -> Manifest:
    """The multiclass test bundle's manifest with coded grades, as `fedclinic-hub export` writes them."""
    classes = [
        ClassLabel(index=k, name=f"grade{k}", code_value=f"DR{k}", code_scheme="99FEDCLINIC", code_meaning=m)
        for k, m in enumerate(("No diabetic retinopathy", "Mild NPDR", "Proliferative diabetic retinopathy"))
    ]
    return manifest.model_copy(
        update={"task": TaskSpec(kind="multiclass", classes=classes, output_activation="softmax")}
    )


def _graded_finding(ds: Dataset, manifest: Manifest, n: int) -> Finding:
    probs = np.array([1.0 + n % 3, 1.0 + (n * 7) % 5, 1.0 + (n * 3) % 4])
    probs /= probs.sum()
    return findings_from_probabilities(
        probs[None, :],
        [
            AnalysedImage(
                str(ds.SOPInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPClassUID),
                int(ds.get("NumberOfFrames", 1) or 1) - 1,
                int(ds.get("NumberOfFrames", 1) or 1),
            )
        ],
        manifest.task,
    )[0]


def test_the_fast_sr_and_sc_of_a_graded_model_equal_highdicoms_and_pass_dciodvfy(
    shared_data: Path, dicomized: list[Dataset], tmp_path: Path
) -> None:
    manifest = _graded(make_bundle(tmp_path / "graded", kind="multiclass").manifest)
    dciodvfy = shutil.which("dciodvfy") is not None
    compared = 0
    for n, (name, ds) in enumerate(_sources(shared_data, dicomized)):
        finding = _graded_finding(ds, manifest, n)
        assert len(finding.probabilities) == 3 and finding.score == max(finding.probabilities)
        reference = build_sr([ds], [finding], manifest)
        fast = fast_sr([ds], [finding], manifest)
        assert differences(fast, reference) == [], name
        assert differences(_written(fast), _written(reference)) == [], name
        display = np.linspace(0, 1, 40 * 30).reshape(40, 30)
        sc_ref, sc = build_sc(ds, display, finding, manifest, n), fast_sc(ds, display, finding, manifest, n)
        assert differences(sc, sc_ref) == [], name
        if dciodvfy and n % 8 == 0:  # a spread of sources: dciodvfy takes ~0.2 s a file
            sc_path = tmp_path / f"sc-{n}.dcm"
            sc.save_as(sc_path, enforce_file_format=True)
            for kind, path in (("SR", save_result(fast, tmp_path, "sr").path), ("SC", sc_path)):
                assert _dciodvfy_errors(path) == [], f"{kind} of {name}"
        compared += 1
    assert compared >= 80
    # The grade concepts and the probabilities' private concepts are declared once, as 99FEDCLINIC.
    assert [i.CodingSchemeDesignator for i in fast.CodingSchemeIdentificationSequence] == ["99FEDCLINIC"]
    group = next(i for i in fast.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    items = group.ContentSequence[0].ContentSequence
    top = int(np.argmax(finding.probabilities))
    finding_type = next(i for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121071")
    assert finding_type.ConceptCodeSequence[0].CodeValue == f"DR{top}"
    meanings = [i.ConceptNameCodeSequence[0].CodeMeaning for i in items if i.ValueType == "NUM"]
    assert meanings[1:] == [
        "Probability of No diabetic retinopathy",
        "Probability of Mild NPDR",
        "Probability of Proliferative diabetic retinopathy",
    ]
    text = caption(finding, manifest)
    assert text[0].startswith(f"grade{top}  (score") and text[1].startswith("grade0 0.")
    assert all(f"grade{k} {p:.3f}" in text[1] for k, p in enumerate(finding.probabilities))


def _with_envelope(finding: Finding, outside: bool, ratio: float, negative: bool) -> Finding:
    """The finding with an envelope result, and a grey-value one (the test bundle's envelope has both)."""
    return dataclasses.replace(
        finding, outside_envelope=outside, envelope_ratio=ratio, intensity_outside=negative, negative=negative
    )


def test_the_fast_sr_with_an_input_envelope_equals_highdicoms_and_passes_dciodvfy(
    shared_data: Path, dicomized: list[Dataset], tmp_path: Path
) -> None:
    """The real test bundle's manifest (it has an envelope with a grey-value part): every group carries the
    Yes/No, the ratio and whether the image looks negative."""
    found = find_test_bundle()
    if found is None:
        pytest.skip("no test bundle with an input envelope (FEDCLINIC_TEST_BUNDLE)")
    manifest = verify_bundle(found.bundle, load_public_keys(found.public_key)).manifest
    assert manifest.envelope is not None and manifest.envelope.intensity is not None, (
        "rebuild the test bundle"
    )
    dciodvfy = shutil.which("dciodvfy") is not None
    compared = 0
    for n, (name, ds) in enumerate(_sources(shared_data, dicomized)):
        if n % 3:  # a spread of sources: each build through highdicom takes ~0.15 s
            continue
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        for outside, ratio, negative in ((False, 0.4127, False), (True, 17.25 + n, n % 2 == 0)):
            plain = _finding(
                ds, manifest, present=(n + int(outside)) % 2 == 0, score=0.3 + n / 1000, frame=frames - 1
            )
            finding = _with_envelope(plain, outside, ratio, negative)
            reference = build_sr([ds], [finding], manifest)
            fast = fast_sr([ds], [finding], manifest)
            assert differences(fast, reference) == [], name
            assert differences(_written(fast), _written(reference)) == [], name
            compared += 1
        sc_ref = build_sc(ds, np.zeros((8, 8)), finding, manifest, n)
        assert differences(fast_sc(ds, np.zeros((8, 8)), finding, manifest, n), sc_ref) == [], name
        if dciodvfy and n % 12 == 0:
            assert _dciodvfy_errors(save_result(fast, tmp_path, "sr").path) == [], name
    assert compared >= 2 * 25
    # Several findings in one SR, inside and outside, with a predecessor: still element for element.
    root = shared_data / "dicom" / "pydicom_testfiles" / "dicomdirtests" / "77654033"
    sources = [
        pydicom.dcmread(root / n, stop_before_pixels=True) for n in ("CR1/6154", "CR2/6247", "CR3/6278")
    ]
    findings = [
        _with_envelope(
            _finding(ds, manifest, present=i != 1, score=0.2 + 0.3 * i), i == 2, 0.5 + 2.0 * i, i == 2
        )
        for i, ds in enumerate(sources)
    ]
    prior = ReportRef(generate_uid(), generate_uid())
    fast = fast_sr(sources, findings, manifest, predecessor=prior)
    assert differences(fast, build_sr(sources, findings, manifest, predecessor=prior)) == []
    container = next(i for i in fast.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    for group, finding in zip(container.ContentSequence, findings, strict=True):
        items = group.ContentSequence
        nums = [i for i in items if i.ValueType == "NUM"]
        assert [i.ConceptNameCodeSequence[0].CodeValue for i in nums] == ["MODELSCORE", "ENVRATIO"]
        assert float(nums[1].MeasuredValueSequence[0].FloatingPointValue) == finding.envelope_ratio
        unit = nums[1].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodingSchemeDesignator, unit.CodeValue) == ("UCUM", "{ratio}")
        (judged,) = [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == "INENVELOPE"]
        assert judged.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99FEDCLINIC"
        assert judged.ConceptCodeSequence[0].CodeValue == (
            "373067005" if finding.outside_envelope else "373066001"
        )
    if dciodvfy:
        assert _dciodvfy_errors(save_result(fast, tmp_path, "sr").path) == []
