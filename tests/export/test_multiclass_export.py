"""A 5-grade RetinaMNIST student through `fedclinic-hub export`: softmax task, coded classes, K-class gate."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.manifest import ClassLabel
from export.errors import ExportError
from export.metrics import output_accuracy, output_auc
from export.parity import cpu_session, run_onnx
from export.pipeline import task_spec
from export.signing import create_keypair, load_public_key_file
from hub.commands.export_bundle import FEDCLINIC_SCHEME, build_bundle
from hub.data.medmnist import load_medmnist
from hub.models.fl_cnn import FL_BENCH_28, fl_cnn
from hub.training.checkpoint import load_checkpoint
from hub.training.distill import save_student


@pytest.fixture(scope="module")
def retina_student(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A K = 5 student trained briefly (cross-entropy) on the grey RetinaMNIST train split."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("retina") / "student"
    model = fl_cnn(norm="group", num_outputs=5)
    config = load_checkpoint(save_student(path, model, "retinamnist", {}, source="test")).config
    train = load_medmnist("retinamnist", "train", shared_data)
    x = torch.from_numpy(config.data_config.preprocess(train.images))  # (N, 1, 28, 28), colour → luma
    y = torch.from_numpy(train.labels)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save_student(path, model.eval(), "retinamnist", {"val_auc": 0.5}, source="test")


def test_a_k_class_student_exports_as_a_softmax_bundle_with_coded_classes(
    retina_student: Path, tmp_path: Path, shared_data: Path
) -> None:
    private, public = create_keypair(tmp_path / "keys")
    report = build_bundle(
        retina_student, private, tmp_path / "bundle", model_version="1.0.0", data_root=shared_data
    )
    m = verify_bundle(report.bundle_dir, [load_public_key_file(public)]).manifest
    assert m.task.kind == "multiclass" and m.task.output_activation == "softmax"
    assert [c.name for c in m.task.classes] == [f"grade{k}" for k in range(5)]
    assert [c.code_value for c in m.task.classes] == [f"DR{k}" for k in range(5)]
    assert {c.code_scheme for c in m.task.classes} == {FEDCLINIC_SCHEME}
    assert m.preprocessing.modalities == ["OP"] and m.preprocessing.color == "luminance"
    assert m.io.outputs[0].shape == [-1, 5]
    assert m.head is not None and m.head.num_outputs == 5
    # The gate's numbers are the K-class ones, read from the shipped ONNX on the real test split.
    test = load_medmnist("retinamnist", "test", shared_data)
    cfg = load_checkpoint(retina_student).config.data_config
    logits = run_onnx(cpu_session(report.bundle_dir / "model.onnx"), cfg.preprocess(test.images))
    assert logits.shape == (len(test), 5)
    assert m.provenance.metrics["test_auc_fp32"] == pytest.approx(output_auc(test.labels, logits))
    assert m.provenance.metrics["test_accuracy_fp32"] == pytest.approx(output_accuracy(test.labels, logits))
    assert 0.55 < m.provenance.metrics["test_auc_fp32"] <= 1.0  # trained: better than chance on 5 grades
    quant = report.quantization
    assert quant is not None and quant.int8_accuracy is not None and math.isfinite(quant.int8_auc)
    assert ("test_accuracy_int8" in m.provenance.metrics) == quant.accepted
    assert report.parity.max_abs_diff <= 1e-4


def test_k_class_metrics_and_the_class_list_must_fit_the_outputs() -> None:
    y = np.array([0, 1, 2, 2])
    logits = np.log(np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]]))
    assert output_accuracy(y, logits) == 0.75
    assert output_auc(y, logits) == pytest.approx(1.0)
    assert output_auc(np.array([0, 1]), np.array([[-1.0], [2.0]])) == 1.0  # one logit: binary AUC
    three = [ClassLabel(index=k, name=f"c{k}") for k in range(3)]
    spec = task_spec(replace(FL_BENCH_28, num_outputs=3), three)
    assert spec.kind == "multiclass" and len(spec.classes) == 3
    assert task_spec(FL_BENCH_28, three[:2]).kind == "binary"
    with pytest.raises(ExportError, match=r"classes 0\.\.4"):
        task_spec(replace(FL_BENCH_28, num_outputs=5), three)
