"""The input envelope at the edge: the real test bundle (PneumoniaMNIST student with an envelope and its
intensity part), ONNX Runtime, real CR instances. Each SR group says whether its image lies within the
envelope, agreeing with an independent computation on that image's embedding and grey values; a noise image
is outside; an image whose header says MONOCHROME1 for MONOCHROME2 pixels looks negative; a bundle without an
envelope gives the SR it always gave; the capture says so too; the log line carries counts only."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import highdicom as hd
import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from edge_node.analysis.analyzer import StudyOutcome, analyze_study
from edge_node.analysis.capture_sc import LOOKS_NEGATIVE, OUTSIDE_ENVELOPE, caption
from edge_node.analysis.findings import AnalysedImage, Finding, findings_from_probabilities
from edge_node.analysis.preprocessing import preprocess
from edge_node.analysis.report_sr import (
    ENVELOPE_CODE_VALUE,
    ENVELOPE_RATIO_CODE_VALUE,
    NEGATIVE_CODE_VALUE,
    PRIVATE_SCHEME,
    SCORE_CODE_VALUE,
    build_sr,
    envelope_concept,
    envelope_ratio_concept,
    negative_concept,
)
from edge_node.analysis.result_warmup import warm_up_results
from edge_node.inference.loaded_model import LoadedModel, load_model
from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck
from edge_node.protocol.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest, canonical_json
from edge_node.protocol.signing import load_public_keys
from tests.edge_node.analysis.test_report_template import differences
from tests.edge_node.conftest import TrustedBundle, instance_rows
from tests.support.dicomgen import medmnist_studies

#: PneumoniaMNIST test images analysed as one CR study; then one of them again with a display header that
#: says the wrong thing, and strong noise.
TEST_IMAGES = [0, 1, 2, 3, 4, 5]
#: The test image sent again as MONOCHROME1: its inverse lies outside the bundle's intensity envelope (most
#: inverted PneumoniaMNIST images do not, their histograms being nearly symmetric).
NEGATIVE_IMAGE = 3
ENVELOPE_ITEMS = frozenset({ENVELOPE_CODE_VALUE, ENVELOPE_RATIO_CODE_VALUE, NEGATIVE_CODE_VALUE})


def _load(bundle: Path, public_key: Path) -> LoadedModel:
    return load_model(verify_bundle(bundle, load_public_keys(public_key)), ["CPUExecutionProvider"], 1)


@pytest.fixture(scope="module")
def envelope_model(test_bundle: TrustedBundle) -> LoadedModel:
    model = _load(test_bundle.bundle, test_bundle.public_key)
    if model.manifest.envelope is None or model.manifest.envelope.intensity is None:
        pytest.fail(
            f"the test bundle at {test_bundle.bundle} has no input envelope with intensity; rebuild it"
        )
    return model


@pytest.fixture(scope="module")
def plain_model(test_bundle: TrustedBundle, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The same bundle with ``envelope`` taken out of its manifest, re-signed with the key that signed it."""
    key_file = test_bundle.bundle.parent / "keys" / "hub.key"
    if not key_file.is_file():
        pytest.fail(f"no hub key at {key_file} to re-sign the test bundle with (make test-bundle writes it)")
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    dest = tmp_path_factory.mktemp("plain") / "bundle"
    shutil.copytree(test_bundle.bundle, dest)
    data = json.loads((dest / MANIFEST_FILE).read_text())
    del data["envelope"]
    (dest / MANIFEST_FILE).write_text(json.dumps(data, indent=2))
    (dest / SIGNATURE_FILE).write_bytes(key.sign(canonical_json(data)))
    model = _load(dest, test_bundle.public_key)
    assert model.manifest.envelope is None and model.envelope is None
    return model


@dataclass(frozen=True)
class Study:
    paths: list[Path]
    #: The instance whose pixels were replaced by noise.
    noise_uid: str
    #: A test image again with MONOCHROME1 in its header for MONOCHROME2 pixels: it looks like a negative.
    negative_uid: str


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Study:
    """Six real test images, one of them again as MONOCHROME1, and one of uniform noise over the whole stored
    range, as one CR study."""
    out = tmp_path_factory.mktemp("study")
    written = medmnist_studies("pneumoniamnist", "test", TEST_IMAGES, out, root=shared_data)
    study_uid = generate_uid()
    paths = []
    for w in written:
        ds = pydicom.dcmread(w.path)
        ds.StudyInstanceUID = study_uid
        ds.save_as(w.path, enforce_file_format=True)
        paths.append(w.path)
    ds = pydicom.dcmread(written[TEST_IMAGES.index(NEGATIVE_IMAGE)].path)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    negative_path = out / "negative.dcm"
    ds.save_as(negative_path, enforce_file_format=True)
    paths.append(negative_path)
    negative_uid = str(ds.SOPInstanceUID)
    ds = pydicom.dcmread(written[0].path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    pixels = ds.pixel_array
    top = (1 << int(ds.BitsStored)) - 1
    noise = np.random.default_rng(20260105).integers(0, top + 1, size=pixels.shape)
    ds.PixelData = noise.astype(pixels.dtype).tobytes()
    noise_path = out / "noise.dcm"
    ds.save_as(noise_path, enforce_file_format=True)
    return Study([*paths, noise_path], str(ds.SOPInstanceUID), negative_uid)


@dataclass(frozen=True)
class Expected:
    """One image's envelope result, computed here from its embedding and its grey values."""

    outside: bool
    ratio: float
    #: The embedding part's alone.
    embedding_outside: bool
    embedding_ratio: float
    intensity_outside: bool
    negative: bool


def _expected(manifest: Manifest, bundle: Path, paths: list[Path]) -> dict[str, Expected]:
    """Each instance's envelope result, computed here: the manifest's preprocessing, ONNX Runtime directly for
    the embedding, and the model input before normalisation for the grey values."""
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert manifest.head is not None and manifest.envelope is not None
    assert manifest.envelope.intensity is not None
    check = EnvelopeCheck.of(manifest.envelope)
    grey_check = IntensityCheck.of(manifest.envelope.intensity)
    pre = manifest.preprocessing
    out: dict[str, Expected] = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        tensor = preprocess(ds, pre).tensor[None].astype(np.float32)
        (embedding,) = session.run([manifest.head.embedding_output], {manifest.io.inputs[0].name: tensor})
        embedding_outside = bool(check.outside(embedding)[0])
        embedding_ratio = float(check.distances(embedding)[0] / check.threshold)
        grey = tensor[:, 0].astype(np.float64) * pre.std[0] + pre.mean[0]  # (1, H, W) in [0, 1]
        seen = grey_check.judge(grey)
        out[str(ds.SOPInstanceUID)] = Expected(
            outside=embedding_outside or bool(seen.outside[0]),
            ratio=max(embedding_ratio, float(seen.ratio[0])),
            embedding_outside=embedding_outside,
            embedding_ratio=embedding_ratio,
            intensity_outside=bool(seen.outside[0]),
            negative=bool(seen.negative[0]),
        )
    return out


def _sr_path(outcome: StudyOutcome) -> Path:
    (path,) = [f.path for f in outcome.outputs if f.path.name.startswith("sr-")]
    return path


def _groups(path: Path) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The SR's measurement groups by the SOP Instance UID of the image each refers to."""
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = {}
    for group in report.get_image_measurement_groups():
        (image,) = [i for i in _walk(list(group)) if i.ValueType == "IMAGE"][:1]
        groups[str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)] = group
    return groups


def _walk(items: list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(list(item.get("ContentSequence", [])))


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def test_each_group_says_whether_its_image_lies_within_the_envelope(
    study: Study,
    envelope_model: LoadedModel,
    test_bundle: TrustedBundle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manifest = envelope_model.manifest
    expected = _expected(manifest, test_bundle.bundle, study.paths)
    # The noise image is surely outside: far beyond the threshold, not at its edge.
    assert expected[study.noise_uid].embedding_ratio > 5
    assert not all(e.outside for e in expected.values())  # and real test images are inside (most of them)
    # The image with the wrong display header: outside by its grey values, and like a negative of the
    # validation images; no real test image looks negative.
    assert (expected[study.negative_uid].intensity_outside, expected[study.negative_uid].negative) == (
        True,
        True,
    )
    assert [uid for uid, e in expected.items() if e.negative] == [study.negative_uid]

    with caplog.at_level(logging.INFO, logger="edge_node"):
        outcome = analyze_study(instance_rows(study.paths), envelope_model, tmp_path / "out")
    assert outcome.status == "done" and len(outcome.findings) == len(study.paths)
    for f in outcome.findings:
        e = expected[f.sop_instance_uid]
        assert f.outside_envelope is e.outside
        assert f.envelope_ratio == pytest.approx(e.ratio, rel=1e-5)
        assert (f.intensity_outside, f.negative) == (e.intensity_outside, e.negative)

    groups = _groups(_sr_path(outcome))
    assert set(groups) == set(expected)
    for uid, group in groups.items():
        outside, ratio = expected[uid].outside, expected[uid].ratio
        (evaluation,) = group.get_qualitative_evaluations(name=envelope_concept())
        assert evaluation.name.scheme_designator == PRIVATE_SCHEME
        value = cast(hd.sr.CodedConcept, evaluation.value)
        assert (value.scheme_designator, value.value) == (
            "SCT",
            "373067005" if outside else "373066001",
        )  # No/Yes
        # With the grey-value part: whether the image looks like a negative, Yes only for the one that does.
        (looks,) = group.get_qualitative_evaluations(name=negative_concept())
        assert looks.value == (codes.SCT.Yes if expected[uid].negative else codes.SCT.No)
        (measured,) = group.get_measurements(name=envelope_ratio_concept())
        assert measured.value == pytest.approx(ratio, rel=1e-5)
        assert (measured.unit.scheme_designator, measured.unit.value) == ("UCUM", "{ratio}")
        # The finding and its score come first, as in every SR (readers that take the first keep working).
        assert group.get_measurements()[0].name.value == SCORE_CODE_VALUE
        assert group.get_qualitative_evaluations()[0].name.value == "233604007"  # pneumonia
    no = [uid for uid, g in groups.items() if g.get_qualitative_evaluations()[1].value == codes.SCT.No]
    assert study.noise_uid in no

    if shutil.which("dciodvfy") is not None:
        assert _dciodvfy_errors(_sr_path(outcome)) == []
    # The captures: the outside image's has the warning burnt in (one line more above the same image).
    by_uid = {f.sop_instance_uid: f for f in outcome.findings}
    rows = {}
    for result in outcome.outputs:
        if result.path.name.startswith("sc-"):
            sc = pydicom.dcmread(result.path)
            rows[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)] = int(sc.Rows)
    inside_uid = next(uid for uid, e in expected.items() if not e.outside)
    assert rows[study.noise_uid] > rows[inside_uid]
    assert OUTSIDE_ENVELOPE in caption(by_uid[study.noise_uid], manifest)
    assert OUTSIDE_ENVELOPE not in caption(by_uid[inside_uid], manifest)
    # The negative one also says why, one line more in its secondary capture.
    assert LOOKS_NEGATIVE in caption(by_uid[study.negative_uid], manifest)
    assert LOOKS_NEGATIVE not in caption(by_uid[study.noise_uid], manifest)
    assert rows[study.negative_uid] > rows[study.noise_uid]
    # The log says how many, never which.
    n_outside = sum(e.outside for e in expected.values())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study analysed")]
    assert len(lines) == 1 and f", {n_outside} outside the input envelope" in lines[0]
    text = caplog.text
    for path in study.paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for value in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.PatientID, ds.PatientName):
            assert not str(value) or str(value) not in text


def _without_envelope_items(ds: Dataset) -> Dataset:
    """``ds`` with every content item of the envelope's concepts taken out (recursively, in place)."""
    if "ContentSequence" in ds:
        kept = []
        for item in ds.ContentSequence:
            names = item.get("ConceptNameCodeSequence")
            code = (names[0].CodingSchemeDesignator, names[0].CodeValue) if names else ("", "")
            if code[0] == PRIVATE_SCHEME and code[1] in ENVELOPE_ITEMS:
                continue
            kept.append(_without_envelope_items(item))
        ds.ContentSequence = kept
    return ds


def test_a_bundle_without_an_envelope_gives_the_sr_it_always_gave(
    study: Study, envelope_model: LoadedModel, plain_model: LoadedModel, tmp_path: Path
) -> None:
    plain = analyze_study(instance_rows(study.paths), plain_model, tmp_path / "plain")
    with_envelope = analyze_study(instance_rows(study.paths), envelope_model, tmp_path / "envelope")
    assert all(f.outside_envelope is None and f.envelope_ratio is None for f in plain.findings)
    assert all(f.intensity_outside is None and f.negative is None for f in plain.findings)
    # The same scores: the envelope adds an output to the same run, it changes no probability.
    assert [f.score for f in plain.findings] == pytest.approx(
        [f.score for f in with_envelope.findings], abs=1e-12
    )
    plain_sr = pydicom.dcmread(_sr_path(plain))
    codes_seen = {
        str(i.ConceptNameCodeSequence[0].CodeValue)
        for i in _walk(list(plain_sr.ContentSequence))
        if "ConceptNameCodeSequence" in i
    }
    assert not codes_seen & ENVELOPE_ITEMS
    for group in _groups(_sr_path(plain)).values():
        assert len(group.get_measurements()) == 1 and len(group.get_qualitative_evaluations()) == 1
    # Element by element, the SR without an envelope is the envelope SR less its envelope items (same UIDs).
    stripped = _without_envelope_items(pydicom.dcmread(_sr_path(with_envelope)))
    assert plain_sr.SOPInstanceUID == stripped.SOPInstanceUID
    assert differences(plain_sr, stripped) == []
    # And the capture of an outside image carries no mark when the bundle has no envelope to judge it by.
    noise = next(f for f in plain.findings if f.sop_instance_uid == study.noise_uid)
    assert OUTSIDE_ENVELOPE not in caption(noise, plain_model.manifest)


def test_an_envelope_result_and_a_manifest_must_agree(
    study: Study, envelope_model: LoadedModel, plain_model: LoadedModel
) -> None:
    ds = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    bare = Finding(
        str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), 0.7, "pneumonia", True
    )
    with pytest.raises(ValueError, match="has no result for it"):
        build_sr([ds], [bare], envelope_model.manifest)
    judged = Finding(**{**bare.__dict__, "outside_envelope": True, "envelope_ratio": 3.5})
    with pytest.raises(ValueError, match="the model has no input envelope"):
        build_sr([ds], [judged], plain_model.manifest)
    # The bundle's envelope has a grey-value part: a finding without its result does not fit it.
    with pytest.raises(ValueError, match="grey-value result does not match"):
        build_sr([ds], [judged], envelope_model.manifest)


def test_an_intensity_result_goes_with_each_finding_only_whole(envelope_model: LoadedModel) -> None:
    images = [AnalysedImage(f"1.2.3.{i}", "1.2.3", "1.2.840.10008.5.1.4.1.1.1.1", 0, 1) for i in range(2)]
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    task = envelope_model.task
    outside, ratio = np.array([True, False]), np.array([3.0, 0.5])
    grey_outside, negative = np.array([True, False]), np.array([True, False])
    with_envelope = partial(
        findings_from_probabilities, probs, images, task, outside_envelope=outside, envelope_ratio=ratio
    )
    findings = with_envelope(intensity_outside=grey_outside, negative=negative)
    assert [(f.intensity_outside, f.negative) for f in findings] == [(True, True), (False, False)]
    assert all(f.embedding is None and f.intensity_features is None for f in findings)
    # The features judged go with each finding, one row each.
    embedding, grey = np.arange(6.0).reshape(2, 3), np.arange(4.0).reshape(2, 2)
    featured = with_envelope(
        intensity_outside=grey_outside, negative=negative, embedding=embedding, intensity_features=grey
    )
    for i, f in enumerate(featured):
        assert f.embedding is not None and f.intensity_features is not None
        np.testing.assert_array_equal(f.embedding, embedding[i])
        np.testing.assert_array_equal(f.intensity_features, grey[i])
    assert featured == findings  # the arrays take no part in comparing findings
    with pytest.raises(ValueError, match="3 rows of embedding for 2 analysed images"):
        with_envelope(embedding=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="both the outside flags and the negative flags"):
        with_envelope(intensity_outside=grey_outside)
    with pytest.raises(ValueError, match="the envelope's is missing"):
        findings_from_probabilities(probs, images, task, intensity_outside=grey_outside, negative=negative)


def test_the_result_builders_warm_up_for_every_kind_of_envelope(
    envelope_model: LoadedModel, plain_model: LoadedModel
) -> None:
    manifest = envelope_model.manifest
    assert manifest.envelope is not None and manifest.envelope.intensity is not None
    embedding_only = manifest.model_copy(
        update={"envelope": manifest.envelope.model_copy(update={"intensity": None})}
    )
    for each in (manifest, embedding_only, plain_model.manifest):
        assert warm_up_results(each) > 0.0  # raises if the warm-up finding does not fit the manifest
