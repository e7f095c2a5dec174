"""The bundle's embedding output: the final linear layer's input, named in the manifest, checked at export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_node.inference.loaded_model import load_model
from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.signing import load_public_keys
from export.embedding_head import WithEmbedding, check_head, final_linear
from export.errors import ParityError
from export.onnx_export import EMBEDDING_NAME, OUTPUT_NAME, export_onnx
from export.parity import check_parity, cpu_session, run_onnx_outputs
from export.pipeline import EvalData, ExportReport, ExportRequest, export_bundle
from export.signing import create_keypair, load_private_key
from hub.commands.export_bundle import class_labels
from hub.data.medmnist import ImageSet
from hub.training.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def report(
    student_checkpoint: Checkpoint,
    pneumonia_test: ImageSet,
    pneumonia_val: ImageSet,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExportReport, Path]:
    out = tmp_path_factory.mktemp("embedding-bundle")
    private, public = create_keypair(out / "keys")
    request = ExportRequest(
        model_id="pneumonia-student",
        model_version="2.0.0",
        dataset="pneumoniamnist",
        modalities=["CR", "DX"],
        classes=class_labels("pneumoniamnist", ("normal", "pneumonia")),
        int8=True,
    )
    made = export_bundle(
        student_checkpoint.build_model(),
        student_checkpoint.config.data_config,
        request,
        test=EvalData(pneumonia_test.images, pneumonia_test.labels, "test"),
        calibration=EvalData(pneumonia_val.images, pneumonia_val.labels, "val"),
        private_key=load_private_key(private),
        out_dir=out / "bundle",
    )
    return made, public


def test_manifest_names_the_outputs_and_the_students_head_tensors(
    report: tuple[ExportReport, Path], student_checkpoint: Checkpoint
) -> None:
    manifest = report[0].manifest
    assert [o.name for o in manifest.io.outputs] == [OUTPUT_NAME, EMBEDDING_NAME]
    head = manifest.head
    assert head is not None
    assert (head.embedding_output, head.prediction_output) == (EMBEDDING_NAME, OUTPUT_NAME)
    state = student_checkpoint.build_model().state_dict()
    # The names are the student's own state-dict keys, so a head delta applies to the checkpoint as it is.
    assert list(state[head.weight.name].shape) == head.weight.shape == [1, 64]
    assert list(state[head.bias.name].shape) == head.bias.shape == [1]
    assert manifest.io.outputs[1].shape == [-1, 64]


def test_every_shipped_file_predicts_with_the_head_of_its_embedding(
    report: tuple[ExportReport, Path], student_checkpoint: Checkpoint, pneumonia_test: ImageSet
) -> None:
    made, public = report
    verified = verify_bundle(made.bundle_dir, load_public_keys(public))
    x = student_checkpoint.config.data_config.preprocess(pneumonia_test.images[:200])
    state = student_checkpoint.build_model().state_dict()
    head = made.manifest.head
    assert head is not None
    w = state[head.weight.name].double().numpy()  # (1, 64)
    b = state[head.bias.name].double().numpy()  # (1,)
    for precision, bound in (("fp32", 1e-4), ("int8", 0.05)):
        model = load_model(verified, ["CPUExecutionProvider"], 1, precision=precision)  # type: ignore[arg-type]
        assert model.precision == precision
        emb = model.embed(x)  # (N, 64)
        assert emb.shape == (200, 64) and emb.dtype == np.float32
        logits = np.log(model.probabilities(x)[:, 1]) - np.log(model.probabilities(x)[:, 0])
        # fp32: the recorded head reproduces the prediction; int8 quantises the head too, so only close.
        assert np.abs(emb.astype(np.float64) @ w.T[:, 0] + b[0] - logits).max() < bound


def test_parity_compares_the_embedding_too(student_checkpoint: Checkpoint, tmp_path: Path) -> None:
    model = student_checkpoint.build_model().eval()
    found = final_linear(model)
    assert found is not None and found[0] == "head.fc"
    with torch.no_grad():
        found[1].weight[0, 0] = 0.0  # channel 0 of the embedding no longer reaches the logits
    wrapped = WithEmbedding(model, found[1]).eval()
    exported = export_onnx(wrapped, (1, 28, 28), tmp_path / "m.onnx", with_embedding=True)
    assert exported.embedding_shape == [-1, 64]
    x = np.random.default_rng(0).normal(size=(16, 1, 28, 28)).astype(np.float32)
    assert check_parity(wrapped, exported.path, x).max_abs_diff <= 1e-4
    # A change only the embedding shows (channel 0, which the head ignores) is caught all the same.
    with torch.no_grad():
        bn = model.get_submodule("features.4.1")  # the last conv block's BatchNorm
        assert isinstance(bn, nn.BatchNorm2d)
        bn.bias[0] += 0.5
    with torch.inference_mode():
        logits, emb = wrapped(torch.from_numpy(x))
    got = run_onnx_outputs(cpu_session(exported.path), x)
    assert np.abs(got[0] - logits.numpy()).max() <= 1e-4  # the logits still agree
    assert np.abs(got[1] - emb.numpy()).max() > 1e-3
    with pytest.raises(ParityError, match="differs from torch"):
        check_parity(wrapped, exported.path, x)


def test_a_model_with_work_after_its_last_linear_is_refused(
    student_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    base = student_checkpoint.build_model().eval()
    scaled = nn.Sequential(base, nn.Hardtanh(-0.1, 0.1)).eval()  # clips the logits after the head
    found = final_linear(scaled)
    assert found is not None
    wrapped = WithEmbedding(scaled, found[1]).eval()
    exported = export_onnx(wrapped, (1, 28, 28), tmp_path / "m.onnx", with_embedding=True)
    x = np.random.default_rng(1).normal(size=(32, 1, 28, 28)).astype(np.float32) * 3
    logits, emb = run_onnx_outputs(cpu_session(exported.path), x)
    with pytest.raises(ParityError, match="not the final linear layer"):
        check_head(logits, emb, found[1], bound=1e-4)
    assert final_linear(nn.Sequential(nn.Conv2d(1, 1, 3))) is None
