"""Export pipeline on a really trained student: ONNX checker, parity on real images, int8 gating, signing."""

from __future__ import annotations

import dataclasses
import json
import math
import stat
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck
from edge_node.protocol.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    IOSpec,
    Provenance,
    TaskSpec,
    TensorSpec,
    canonical_json,
)
from edge_node.protocol.signing import fingerprint, verify_signature
from export.bundle_writer import BundleFile, producer_info, sha256_file, write_bundle, zip_bundle
from export.envelope import INTENSITY_COPIES
from export.errors import ExportError, KeyFileError, ParityError
from export.metrics import roc_auc
from export.onnx_export import OPSET, export_onnx
from export.parity import check_parity, cpu_session, run_onnx, run_onnx_outputs
from export.pipeline import EvalData, ExportReport, ExportRequest, export_bundle, preprocessing_for
from export.quantize import quantize_gated
from export.signing import (
    create_keypair,
    generate_private_key,
    load_private_key,
    load_public_key_file,
    save_private_key,
)
from hub.commands.export_bundle import class_labels
from hub.data.medmnist import ImageSet
from hub.training.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def exported(student_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = student_checkpoint.build_model()
    return export_onnx(
        model,
        student_checkpoint.config.data_config.input_size,
        tmp_path_factory.mktemp("onnx") / "model.onnx",
    ).path


def test_exported_model_passes_the_checker_with_pinned_opset_and_dynamic_batch(exported: Path) -> None:
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    session = cpu_session(exported)
    for batch in (1, 7):
        out = session.run(None, {"image": np.zeros((batch, 1, 28, 28), np.float32)})[0]
        assert out.shape == (batch, 1)


def test_parity_holds_on_real_test_images(
    student_checkpoint: Checkpoint, exported: Path, pneumonia_test: ImageSet
) -> None:
    x = student_checkpoint.config.data_config.preprocess(pneumonia_test.images)
    report = check_parity(student_checkpoint.build_model(), exported, x, bound=1e-4)
    assert report.num_images == 624
    assert report.max_abs_diff <= 1e-4


def test_parity_catches_a_model_that_differs_from_its_export(
    student_checkpoint: Checkpoint, exported: Path, pneumonia_test: ImageSet
) -> None:
    model = student_checkpoint.build_model()
    fc = model.get_submodule("head.fc")
    assert isinstance(fc, torch.nn.Linear)
    with torch.no_grad():
        fc.bias.add_(0.01)  # the ONNX file no longer matches these weights
    x = student_checkpoint.config.data_config.preprocess(pneumonia_test.images[:64])
    with pytest.raises(ParityError, match="differs from torch"):
        check_parity(model, exported, x, bound=1e-4)


def test_auc_of_the_exported_model_and_where_it_is_undefined(
    student_checkpoint: Checkpoint, exported: Path, pneumonia_test: ImageSet
) -> None:
    x = student_checkpoint.config.data_config.preprocess(pneumonia_test.images)
    scores = run_onnx(cpu_session(exported), x)[:, 0]
    # A trained student ranks pneumonia above normal on the held-out test split.
    assert 0.75 < roc_auc(pneumonia_test.labels, scores) <= 1.0
    assert math.isnan(roc_auc(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4])))  # one class: undefined
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc(np.array([0, 1, 0]), np.array([0.5, 0.5]))


def test_int8_is_shipped_within_tolerance_and_refused_at_minus_one(
    student_checkpoint: Checkpoint,
    exported: Path,
    pneumonia_test: ImageSet,
    pneumonia_val: ImageSet,
    tmp_path: Path,
) -> None:
    cfg = student_checkpoint.config.data_config
    kwargs = {
        "calibration": cfg.preprocess(pneumonia_val.images),
        "test_x": cfg.preprocess(pneumonia_test.images),
        "test_y": pneumonia_test.labels,
    }
    ok = quantize_gated(exported, tmp_path / "ok.int8.onnx", tolerance=0.01, **kwargs)
    assert ok.accepted and ok.path is not None and ok.path.is_file()
    assert ok.fp32_auc - ok.int8_auc <= 0.01
    assert ok.size_bytes < exported.stat().st_size / 2
    assert ok.calibration_images == len(pneumonia_val)

    refused = quantize_gated(exported, tmp_path / "no.int8.onnx", tolerance=-1, **kwargs)
    assert not refused.accepted and refused.path is None
    assert not (tmp_path / "no.int8.onnx").exists()
    assert "exceeds tolerance" in refused.reason


def test_private_keys_are_0600_and_looser_modes_are_refused(tmp_path: Path) -> None:
    private, public = create_keypair(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private)
    sig = key.sign(b"payload")
    assert verify_signature(load_public_key_file(public), b"payload", sig)
    with pytest.raises(KeyFileError, match="already exists"):
        create_keypair(tmp_path)
    private.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(private)
    save_private_key(generate_private_key(), private, overwrite=True)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def _request(int8: bool, tolerance: float = 0.01) -> ExportRequest:
    return ExportRequest(
        model_id="pneumonia-student",
        model_version="1.2.3",
        dataset="pneumoniamnist",
        modalities=["CR", "DX"],
        classes=class_labels("pneumoniamnist", ("normal", "pneumonia")),
        training_metrics={"val_auc": 0.9},
        int8=int8,
        int8_tolerance=tolerance,
    )


def _export(
    checkpoint: Checkpoint,
    request: ExportRequest,
    test: ImageSet,
    val: ImageSet,
    key: Ed25519PrivateKey,
    out: Path,
) -> ExportReport:
    """The whole export of the trained student, checked on the test split, int8 calibrated on val."""
    return export_bundle(
        checkpoint.build_model(),
        checkpoint.config.data_config,
        request,
        test=EvalData(test.images, test.labels, "test"),
        calibration=EvalData(val.images, val.labels, "val"),
        private_key=key,
        out_dir=out,
    )


def test_full_export_writes_a_bundle_the_edge_verifies(
    student_checkpoint: Checkpoint, pneumonia_test: ImageSet, pneumonia_val: ImageSet, tmp_path: Path
) -> None:
    private, public = create_keypair(tmp_path / "keys")
    key = load_private_key(private)
    cfg = student_checkpoint.config.data_config
    report = _export(
        student_checkpoint, _request(int8=True), pneumonia_test, pneumonia_val, key, tmp_path / "bundle"
    )
    assert report.shipped == ["model.onnx", "model.int8.onnx"]
    assert sorted(p.name for p in report.bundle_dir.iterdir()) == sorted(
        ["model.onnx", "model.int8.onnx", MANIFEST_FILE, SIGNATURE_FILE]
    )
    m = report.manifest
    assert m.preprocessing.modalities == ["CR", "DX"]
    assert m.preprocessing.voi == ["header_window", "bit_depth"]
    assert m.preprocessing.size == (28, 28) and m.preprocessing.interpolation == "area"
    assert m.preprocessing.mean == list(cfg.mean) and m.preprocessing.std == list(cfg.std)
    assert m.task.classes[1].code_value == "233604007"
    assert m.producer.opset == OPSET and m.producer.torch_version
    assert m.provenance.parity_max_abs_diff is not None and m.provenance.parity_max_abs_diff <= 1e-4
    assert m.provenance.metrics["test_auc_fp32"] == pytest.approx(report.fp32_auc)
    assert "test_auc_int8" in m.provenance.metrics
    # The input envelope: fitted on the validation images, about 1 % of test images outside by chance.
    assert m.envelope is not None and m.head is not None
    assert m.envelope.fitted_on == len(pneumonia_val.labels)
    assert m.envelope.dim == m.head.embedding_dim and m.envelope.quantile == 0.99
    test_x = cfg.preprocess(pneumonia_test.images)
    embedding = run_onnx_outputs(cpu_session(report.bundle_dir / "model.onnx"), test_x)[1]
    # Its intensity part: the same validation images' grey values, before normalisation.
    assert m.envelope.intensity is not None and m.envelope.intensity.fitted_on == len(pneumonia_val.labels)
    assert m.envelope.intensity.augmented_copies == INTENSITY_COPIES
    grey = test_x[:, 0].astype(np.float64) * cfg.std[0] + cfg.mean[0]
    np.testing.assert_allclose(grey, pneumonia_test.images / 255.0, atol=1e-6)
    grey_outside = IntensityCheck.of(m.envelope.intensity).judge(grey).outside
    assert m.provenance.metrics["test_outside_intensity"] == pytest.approx(float(grey_outside.mean()))
    # A node counts an image outside either part.
    outside = float((EnvelopeCheck.of(m.envelope).outside(embedding) | grey_outside).mean())
    assert m.provenance.metrics["test_outside_envelope_fp32"] == pytest.approx(outside)
    assert outside <= 0.05 and m.provenance.metrics["test_outside_envelope_int8"] <= 0.05
    # Pretty on disk, signed over canonical bytes.
    raw = (report.bundle_dir / MANIFEST_FILE).read_bytes()
    assert b"\n  " in raw and canonical_json(json.loads(raw)) == m.canonical_bytes()
    trusted = load_public_key_file(public)
    verified = verify_bundle(report.bundle_dir, [trusted])
    assert verified.key_fingerprint == fingerprint(trusted) == report.key_fingerprint
    assert verified.variant_path("int8") == verified.root / "model.int8.onnx"
    # The zip form verifies too.
    verified_zip = verify_bundle(
        zip_bundle(report.bundle_dir, tmp_path / "b.zip"), [trusted], extract_to=tmp_path / "unzipped"
    )
    assert verified_zip.manifest == m
    # Bundles are immutable: the same folder is never written twice.
    with pytest.raises(ExportError, match="immutable"):
        _export(
            student_checkpoint, _request(int8=False), pneumonia_test, pneumonia_val, key, tmp_path / "bundle"
        )


def test_export_without_accepted_int8_ships_fp32_only(
    student_checkpoint: Checkpoint, pneumonia_test: ImageSet, pneumonia_val: ImageSet, tmp_path: Path
) -> None:
    report = _export(
        student_checkpoint,
        _request(int8=True, tolerance=-1),
        pneumonia_test,
        pneumonia_val,
        generate_private_key(),
        tmp_path / "bundle",
    )
    assert report.shipped == ["model.onnx"]
    assert report.quantization is not None and not report.quantization.accepted
    assert not (tmp_path / "bundle" / "model.int8.onnx").exists()


def test_export_without_an_envelope_leaves_the_key_out(
    student_checkpoint: Checkpoint, pneumonia_test: ImageSet, pneumonia_val: ImageSet, tmp_path: Path
) -> None:
    private, public = create_keypair(tmp_path / "keys")
    request = dataclasses.replace(_request(int8=False), envelope=False)
    report = _export(
        student_checkpoint,
        request,
        pneumonia_test,
        pneumonia_val,
        load_private_key(private),
        tmp_path / "bundle",
    )
    assert report.manifest.envelope is None
    assert "envelope" not in json.loads((report.bundle_dir / MANIFEST_FILE).read_bytes())
    assert not any("envelope" in k for k in report.manifest.provenance.metrics)
    assert verify_bundle(report.bundle_dir, [load_public_key_file(public)]).manifest.envelope is None


def test_bundle_file_names_must_be_plain(signed_parts: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(b"x")
    for bad in ("../m.onnx", "manifest.json"):
        with pytest.raises(ExportError, match="plain names"):
            write_bundle(tmp_path / "b", [BundleFile(src, bad)], **signed_parts)
    assert not (tmp_path / "b").exists()
    manifest = write_bundle(tmp_path / "b", [BundleFile(src, "m.onnx")], **signed_parts)
    assert manifest.files[0].sha256 == sha256_file(src)


@pytest.fixture()
def signed_parts(student_checkpoint: Checkpoint) -> dict[str, Any]:
    cfg = student_checkpoint.config.data_config
    return {
        "model_id": "m",
        "model_version": "0.0.1",
        "task": TaskSpec(
            kind="binary", classes=class_labels("pneumoniamnist", cfg.labels), output_activation="sigmoid"
        ),
        "io": IOSpec(
            inputs=[TensorSpec(name="image", shape=[-1, 1, 28, 28])],
            outputs=[TensorSpec(name="logits", shape=[-1, 1])],
        ),
        "preprocessing": preprocessing_for(cfg, ["CR"]),
        "provenance": Provenance(
            training="supervised", dataset="pneumoniamnist", created_at="2026-01-01T00:00:00+00:00"
        ),
        "producer": producer_info(OPSET),
        "private_key": generate_private_key(),
    }
