"""Result objects read back with pydicom/highdicom: SR references, score, codes, study; SC burnt-in image."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from edge_node.analysis.capture_sc import MIN_SIDE, build_sc
from edge_node.analysis.capture_template import write_fast_sc
from edge_node.analysis.findings import Finding
from edge_node.analysis.preprocessing import preprocess
from edge_node.analysis.report_sr import SCORE_CODE_VALUE, build_sr
from edge_node.analysis.report_template import write_fast_sr
from edge_node.protocol.manifest import Manifest
from edge_node.state.runs import ReportRef
from tests.support.onnxgen import make_bundle

CR_FILES = ("CR1/6154", "CR2/6247", "CR3/6278")


@pytest.fixture
def sources(shared_data: Path) -> list[Dataset]:
    """Three real CR instances of one study (three series), MONOCHROME1, 12-bit."""
    root = shared_data / "dicom" / "pydicom_testfiles" / "dicomdirtests" / "77654033"
    return [pydicom.dcmread(root / name) for name in CR_FILES]


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    return make_bundle(tmp_path / "bundle").manifest


def _findings(sources: list[Dataset], scores: list[float], threshold: float = 0.5) -> list[Finding]:
    return [
        Finding(
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            score=s,
            label="pneumonia" if s >= threshold else "normal",
            present=s >= threshold,
        )
        for ds, s in zip(sources, scores, strict=True)
    ]


def _walk(items: Iterator[Dataset] | list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def test_sr_in_source_study_with_references_scores_and_codes(
    tmp_path: Path, sources: list[Dataset], manifest: Manifest
) -> None:
    scores = [0.91234567, 0.12, 0.5]
    findings = _findings(sources, scores)
    path = write_fast_sr(sources, findings, manifest, tmp_path / "out").path
    assert path.parent == tmp_path / "out" and path.read_bytes()[128:132] == b"DICM"

    sr = pydicom.dcmread(path)
    src = sources[0]
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        assert sr.get(keyword) == src.get(keyword), keyword
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in sources}
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in sources}

    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert len(groups) == 3
    for group, ds, finding in zip(groups, sources, findings, strict=True):
        (source,) = [i for i in _walk(list(group)) if i.ValueType == "IMAGE"][:1]
        ref = source.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == ds.SOPClassUID
        (score,) = group.get_measurements()
        assert score.name.value == SCORE_CODE_VALUE
        assert score.value == pytest.approx(finding.score, abs=1e-12)
        assert score.unit.value == "1" and score.unit.scheme_designator == "UCUM"
        (evaluation,) = group.get_qualitative_evaluations()
        assert (evaluation.name.scheme_designator, evaluation.name.value) == ("SCT", "233604007")
        assert cast(hd.sr.CodedConcept, evaluation.value).value == (
            "52101004" if finding.present else "272519000"
        )  # Present / Absent
        texts = {_concept(i): i.TextValue for i in _walk(list(group)) if i.ValueType == "TEXT"}
        assert texts[("DCM", "111001")] == "test-student"  # Algorithm Name
        assert texts[("DCM", "111003")] == "1.2.3"  # Algorithm Version
    observers = [i for i in _walk(sr.ContentSequence) if _concept(i) == ("DCM", "121012")]
    assert observers and all(i.ValueType == "UIDREF" for i in observers)  # Device Observer UID


def test_sr_uids_are_deterministic(sources: list[Dataset], manifest: Manifest) -> None:
    findings = _findings(sources, [0.7, 0.2, 0.4])
    a = build_sr(sources, findings, manifest)
    b = build_sr(sources, _findings(sources, [0.1, 0.2, 0.3]), manifest)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    newer = build_sr(sources, findings, manifest.model_copy(update={"model_version": "1.2.4"}))
    assert newer.SOPInstanceUID != a.SOPInstanceUID
    assert len({a.SOPInstanceUID, a.SeriesInstanceUID, newer.SeriesInstanceUID}) == 3


def test_a_reanalysis_with_more_instances_is_a_successor_sr(
    sources: list[Dataset], manifest: Manifest
) -> None:
    first = build_sr(sources[:2], _findings(sources[:2], [0.7, 0.2]), manifest)
    assert "PredecessorDocumentsSequence" not in first
    prior = ReportRef(str(first.SOPInstanceUID), str(first.SeriesInstanceUID))
    again = build_sr(sources[:2], _findings(sources[:2], [0.7, 0.2]), manifest, predecessor=prior)
    assert again.SOPInstanceUID == first.SOPInstanceUID and "PredecessorDocumentsSequence" not in again
    late = build_sr(sources, _findings(sources, [0.7, 0.2, 0.4]), manifest, predecessor=prior)
    assert late.SOPInstanceUID != first.SOPInstanceUID and late.SeriesInstanceUID == first.SeriesInstanceUID
    (item,) = late.PredecessorDocumentsSequence
    assert item.StudyInstanceUID == first.StudyInstanceUID
    (series,) = item.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (ref,) = series.ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        first.SOPClassUID,
        first.SOPInstanceUID,
    )


def test_sr_for_a_multiclass_model_codes_the_predicted_class(tmp_path: Path, sources: list[Dataset]) -> None:
    manifest = make_bundle(tmp_path / "multi", kind="multiclass").manifest
    finding = Finding(
        sop_instance_uid=str(sources[0].SOPInstanceUID),
        series_instance_uid=str(sources[0].SeriesInstanceUID),
        sop_class_uid=str(sources[0].SOPClassUID),
        score=0.6,
        label="grade2",
        present=True,
        probabilities=(0.1, 0.3, 0.6),
    )
    path = write_fast_sr(sources[:1], [finding], manifest, tmp_path).path
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.scheme_designator, evaluation.name.meaning) == ("99FEDCLINIC", "grade2")
    assert cast(hd.sr.CodedConcept, evaluation.value).value == "52101004"  # Present
    # The top class's score, then every class's probability, as read back by highdicom.
    measured = [(m.name.value, m.value) for m in group.get_measurements()]
    assert measured == [("MODELSCORE", 0.6), ("CLASSPROB0", 0.1), ("CLASSPROB1", 0.3), ("CLASSPROB2", 0.6)]
    with pytest.raises(ValueError, match="2 class probabilities"):
        build_sr(sources[:1], [dataclasses.replace(finding, probabilities=(0.4, 0.6))], manifest)


def test_sr_refuses_inconsistent_input(sources: list[Dataset], manifest: Manifest) -> None:
    findings = _findings(sources, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="missing from the sources"):
        build_sr(sources[:1], findings, manifest)
    other = pydicom.Dataset()
    other.update(sources[1])
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="same study"):
        build_sr([sources[0], other], findings[:1], manifest)
    with pytest.raises(ValueError):
        build_sr([], [], manifest)


def test_sc_burns_the_result_into_the_image(
    tmp_path: Path, sources: list[Dataset], manifest: Manifest
) -> None:
    src = sources[0]
    display = preprocess(src, manifest.preprocessing).display  # (16, 16)
    present, absent = _findings([src, src], [0.93, 0.07])
    path = write_fast_sc(src, display, present, manifest, tmp_path).path
    sc = pydicom.dcmread(path)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.PatientID == src.PatientID
    assert sc.BurnedInAnnotation == "YES" and sc.ImageComments == "NOT FOR DIAGNOSTIC USE"
    assert list(sc.PatientOrientation) == ["L", "F"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    pixels = sc.pixel_array
    k = -(-MIN_SIDE // 16)  # integer enlargement of the 16x16 source
    image = np.kron(np.rint(display * 255).astype(np.uint8), np.ones((k, k), np.uint8))
    band = pixels.shape[0] - image.shape[0]
    assert band > 0 and pixels.shape[1] == image.shape[1]
    np.testing.assert_array_equal(pixels[band:], image)
    assert (pixels[:band] == 255).sum() > 200  # white text in the black band
    other = build_sc(src, display, absent, manifest, 0)
    assert not np.array_equal(other.pixel_array[:band], pixels[:band])  # the text says something else
    assert build_sc(src, display, present, manifest, 0).SOPInstanceUID == sc.SOPInstanceUID


def test_sc_without_source_orientation_has_an_empty_one(
    tmp_path: Path, shared_data: Path, manifest: Manifest
) -> None:
    src = pydicom.dcmread(shared_data / "dicom" / "highdicom" / "dx_image.dcm")
    src.PatientOrientation = None
    display = preprocess(src, manifest.preprocessing).display
    (finding,) = _findings([src], [0.4])
    sc = pydicom.dcmread(write_fast_sc(src, display, finding, manifest, tmp_path).path)
    assert not sc.PatientOrientation
    assert max(sc.Rows, sc.Columns) >= MIN_SIDE


def test_results_for_single_component_names_carry_no_phi_into_warnings_or_logs(
    tmp_path: Path,
    sources: list[Dataset],
    manifest: Manifest,
    recwarn: pytest.WarningsRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """highdicom quotes a person name without "^" in a warning: the results must not trigger it."""
    name, patient_id, physician = "QZXWVUTPHI", "PID-QZX-4417", "DRPLKMPHI"
    study = []
    for src in sources:
        ds = pydicom.Dataset()
        ds.update(src)
        ds.file_meta = src.file_meta
        ds.PatientName, ds.PatientID, ds.ReferringPhysicianName = name, patient_id, physician
        study.append(ds)
    findings = _findings(study, [0.8, 0.3, 0.6])
    display = preprocess(study[0], manifest.preprocessing).display
    # Every level of every logger, highdicom's included (the CLI raises its level, and that sticks).
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="highdicom"):
        sr = pydicom.dcmread(write_fast_sr(study, findings, manifest, tmp_path).path)
        sc = pydicom.dcmread(write_fast_sc(study[0], display, findings[0], manifest, tmp_path).path)
    phi = (name, patient_id, physician)
    assert [str(w.message) for w in recwarn] == []
    leaked = [r.getMessage() for r in caplog.records if any(v in r.getMessage() for v in phi)]
    assert leaked == []
    assert caplog.records, "the capture saw highdicom's log (so an empty leak list means something)"
    # The result objects carry the names exactly as the source had them (no added "^").
    for result in (sr, sc):
        assert (str(result.PatientName), result.PatientID) == (name, patient_id)
        assert str(result.ReferringPhysicianName) == physician
    assert str(study[0].PatientName) == name  # the source dataset was not changed either


def test_non_conforming_patient_and_study_values_are_emptied_not_copied(
    tmp_path: Path, sources: list[Dataset], manifest: Manifest, caplog: pytest.LogCaptureFixture
) -> None:
    src = sources[0]
    with pydicom.config.disable_value_validation():  # as a sender would write them, unchecked
        src.PatientSex = "X"  # not M, F or O
        src.PatientBirthDate = "19701345"  # no such day
        src.StudyTime = "25:61"  # neither TM form
        src.PatientName = "A^B^C^D^E^F"  # six components
    del src.ReferringPhysicianName
    findings = _findings([src], [0.7])
    with caplog.at_level(logging.DEBUG):
        sr = pydicom.dcmread(write_fast_sr([src], findings, manifest, tmp_path).path)
        sc = pydicom.dcmread(write_fast_sc(src, np.zeros((32, 32)), findings[0], manifest, tmp_path).path)
    for result in (sr, sc):
        for keyword in (
            "PatientSex",
            "PatientBirthDate",
            "StudyTime",
            "PatientName",
            "ReferringPhysicianName",
        ):
            assert keyword in result and result[keyword].is_empty, keyword
        assert result.PatientID == src.PatientID and result.StudyDate == src.StudyDate
    assert "A^B^C" not in caplog.text and "19701345" not in caplog.text


def test_an_element_pydicom_cannot_convert_does_not_stop_the_result(
    tmp_path: Path, sources: list[Dataset], manifest: Manifest
) -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    src = sources[0]
    # As dcmread leaves an element with an unknown VR: raw until something reads it, then NotImplementedError.
    src[0x00091001] = RawDataElement(Tag(0x00091001), "ZZ", 4, b"1234", 0, False, True)
    findings = _findings([src], [0.7])
    sr = pydicom.dcmread(write_fast_sr([src], findings, manifest, tmp_path).path)
    sc = pydicom.dcmread(write_fast_sc(src, np.zeros((32, 32)), findings[0], manifest, tmp_path).path)
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == src.StudyInstanceUID
