"""Must-show 1, the clinic path: PACS (Orthanc) → edge node → SR and SC back in the PACS, on real data.

PneumoniaMNIST test images wrapped as CR studies go into a real Orthanc over REST, Orthanc pushes each to a
real ``fedclinic-edge serve`` process, and the results are read back from Orthanc. The SR's score must equal
the score that onnxruntime gives the same pixels, computed here independently from the npz file.
A real CT study is stored, skipped with its reason, and does not stop the node.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import highdicom as hd
import numpy as np
import onnxruntime as ort
import pydicom
import pytest

from edge_node.protocol.manifest import Manifest, parse_manifest
from harness.demo.clinic import Clinic
from harness.demo.orthanc import orthanc_available
from harness.demo.traffic import sr_score
from tests.e2e.clinic import node_studies, obtain_bundle
from tests.support.dicomgen import WrappedImage, medmnist_studies

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed (apt-get install orthanc)"),
]

N_PER_CLASS = 4


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    workdir = tmp_path_factory.mktemp("clinic")
    with Clinic(workdir=workdir, bundle=obtain_bundle(workdir), secondary_capture=True) as running:
        yield running


def _bundle_dir(clinic: Clinic) -> Path:
    """The bundle directory the clinic installed (the fixture starts it with one)."""
    assert clinic.bundle is not None
    return clinic.bundle.bundle


@pytest.fixture(scope="module")
def manifest(clinic: Clinic) -> Manifest:
    return parse_manifest((_bundle_dir(clinic) / "manifest.json").read_bytes())


def _independent_scores(images: np.ndarray, manifest: Manifest, model_path: Path) -> np.ndarray:
    """Manifest preprocessing written out for 8-bit 28x28 CR (window 0..255 → x/255; no resize), then ORT."""
    pre = manifest.preprocessing
    assert tuple(pre.size) == images.shape[1:] == (28, 28) and pre.interpolation == "area"
    x = images.astype(np.float64) / 255.0  # (N, 28, 28)
    x = (x - pre.mean[0]) / pre.std[0]
    batch = x[:, None, :, :].astype(np.float32)  # (N, 1, 28, 28)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    # A bundle with an embedding output has two; the score comes from the prediction output.
    output = manifest.head.prediction_output if manifest.head is not None else session.get_outputs()[0].name
    (logits,) = session.run([output], {session.get_inputs()[0].name: batch})
    return np.asarray(1.0 / (1.0 + np.exp(-logits[:, 0].astype(np.float64))))


def _load_instance(clinic: Clinic, instance_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(clinic.orthanc.instance_file(instance_id)))


def test_cr_studies_get_sr_and_sc_with_the_model_score(
    clinic: Clinic, manifest: Manifest, shared_data: Path, tmp_path: Path
) -> None:
    labels = np.load(shared_data / "medmnist" / "pneumoniamnist.npz", allow_pickle=False)["test_labels"][:, 0]
    indices = [int(i) for i in np.flatnonzero(labels == 0)[:N_PER_CLASS]]
    indices += [int(i) for i in np.flatnonzero(labels == 1)[:N_PER_CLASS]]
    studies: list[WrappedImage] = medmnist_studies(
        "pneumoniamnist", "test", indices, tmp_path / "cr", root=shared_data
    )
    with np.load(shared_data / "medmnist" / "pneumoniamnist.npz", allow_pickle=False) as npz:
        pixels = np.asarray(npz["test_images"])[indices]
    expected = _independent_scores(pixels, manifest, _bundle_dir(clinic) / "model.onnx")

    orthanc_ids = []
    for study in studies:
        study_id = clinic.upload_study([study.path])
        answer = clinic.push(study_id)
        assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] == 1
        orthanc_ids.append(study_id)

    scores = []
    for study, study_id, want in zip(studies, orthanc_ids, expected, strict=True):
        series = clinic.wait_results(study_id, ("SR", "OT"))
        # Secondary captures arrive as Modality OT; both are in the source's Orthanc study.
        (sr_series,) = series["SR"]
        (sr_instance,) = sr_series["Instances"]
        sr = _load_instance(clinic, sr_instance)
        assert sr.StudyInstanceUID == study.study_instance_uid
        assert sr.PatientID == f"SYN-pneumoniamnist-test-{study.index:05d}"
        report = hd.sr.ComprehensiveSR.from_dataset(sr).content
        assert isinstance(report, hd.sr.MeasurementReport)
        (group,) = report.get_image_measurement_groups()
        refs = [img.ReferencedSOPSequence[0] for img in group.source_images]
        assert [r.ReferencedSOPInstanceUID for r in refs] == [study.sop_instance_uid]
        assert refs[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
        # The score, then the image's distance from the bundle's input envelope (docs/envelope.md).
        score, ratio = group.get_measurements()
        assert (score.name.value, ratio.name.value) == ("MODELSCORE", "ENVRATIO")
        measured_on = [
            img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for img in score.referenced_images
        ]
        assert measured_on == [study.sop_instance_uid]
        assert score.value == pytest.approx(want, abs=1e-5)
        evaluation, inside, negative = group.get_qualitative_evaluations()
        assert inside.name.value == "INENVELOPE" and negative.name.value == "LOOKSNEG"
        # An ordinary test image does not look like a negative of the validation images.
        assert cast(hd.sr.CodedConcept, negative.value).value == "373067005"  # SCT No
        # A test image like the bundle's validation images: Yes exactly when its ratio is at most 1.
        yes_no = "373066001" if ratio.value <= 1 else "373067005"  # SCT Yes / No
        assert cast(hd.sr.CodedConcept, inside.value).value == yes_no
        assert evaluation.name.value == "233604007"
        assert cast(hd.sr.CodedConcept, evaluation.value).value == (
            "52101004" if want >= 0.5 else "272519000"
        )
        scores.append(float(score.value))

        (sc_series,) = series["OT"]
        sc = _load_instance(clinic, sc_series["Instances"][0])
        assert sc.StudyInstanceUID == study.study_instance_uid and sc.BurnedInAnnotation == "YES"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == study.sop_instance_uid

    # A real student, not noise: the pneumonia images score higher on average than the normal ones.
    assert np.mean(scores[N_PER_CLASS:]) > np.mean(scores[:N_PER_CLASS])
    done = {s.study_uid: s for s in node_studies(clinic)}
    for study in studies:
        assert done[study.study_instance_uid].state == "done"


def test_ct_study_is_skipped_with_a_reason_and_the_node_goes_on(
    clinic: Clinic, shared_data: Path, tmp_path: Path
) -> None:
    ct_files = sorted((shared_data / "dicom" / "tcia_covid19_ny_sbu" / "A002304").glob("*_19001231-*.dcm"))
    ct_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in ct_files}
    assert len(ct_files) == 3 and len(ct_uids) == 1
    ct_study_uid = ct_uids.pop()
    ct_id = clinic.upload_study(ct_files)
    assert clinic.push(ct_id)["FailedInstancesCount"] == 0

    (follow_up,) = medmnist_studies("pneumoniamnist", "test", [100], tmp_path / "cr", root=shared_data)
    cr_id = clinic.upload_study([follow_up.path])
    clinic.push(cr_id)
    clinic.wait_results(cr_id, ("SR",))

    by_uid = {s.study_uid: s for s in node_studies(clinic)}
    ct = by_uid[ct_study_uid]
    assert ct.state == "skipped" and ct.n_instances == 3
    assert ct.reason == "modality CT not accepted by model pneumonia-student (accepts CR, DX) (3 instances)"
    assert by_uid[follow_up.study_instance_uid].state == "done"
    assert set(clinic.series_by_modality(ct_id)) == {"CT"}  # nothing was sent back for the CT study
    status = clinic.edge.cli("status", "--limit", "50")
    assert status.returncode == 0, status.stderr
    assert "skipped" in status.stdout and "modality CT not accepted" in status.stdout
    assert ct_study_uid not in status.stdout  # identifiers only as short hashes
    assert clinic.edge.alive()


def test_tampered_bundle_is_refused_and_the_running_node_keeps_its_model(
    clinic: Clinic, manifest: Manifest, shared_data: Path, tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(_bundle_dir(clinic), tampered)
    weights = tampered / "model.onnx"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= (
        0xFF  # one flipped byte in the weights: its sha256 no longer matches the signed manifest
    )
    weights.write_bytes(bytes(raw))

    refused = clinic.edge.cli("install-bundle", str(tampered))
    assert refused.returncode == 1
    assert "refused" in refused.stdout + refused.stderr
    assert clinic.edge.alive()

    # The node still answers the PACS with the model it had.
    (study,) = medmnist_studies("pneumoniamnist", "test", [7], tmp_path / "cr", root=shared_data)
    study_id = clinic.upload_study([study.path])
    clinic.push(study_id)
    series = clinic.wait_results(study_id, ("SR",))
    with np.load(shared_data / "medmnist" / "pneumoniamnist.npz", allow_pickle=False) as npz:
        pixels = np.asarray(npz["test_images"])[[7]]
    (want,) = _independent_scores(pixels, manifest, _bundle_dir(clinic) / "model.onnx")
    sr = _load_instance(clinic, series["SR"][0]["Instances"][0])
    assert sr_score(sr) == pytest.approx(want, abs=1e-5)
    status = clinic.edge.cli("status")
    assert f"{manifest.model_id} {manifest.model_version}" in status.stdout
