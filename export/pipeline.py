"""Export pipeline: torch model -> checked ONNX -> parity on real images -> gated int8 -> signed bundle."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from edge_node.protocol.envelope import EnvelopeCheck, IntensityCheck
from edge_node.protocol.manifest import (
    ClassLabel,
    HeadSpec,
    InputEnvelope,
    IOSpec,
    Manifest,
    Preprocessing,
    Provenance,
    TaskSpec,
    TensorSpec,
)
from edge_node.protocol.signing import fingerprint
from export.bundle_writer import BundleFile, producer_info, write_bundle
from export.embedding_head import WithEmbedding, check_head, final_linear, head_spec
from export.envelope import DEFAULT_QUANTILE, INTENSITY_COPIES, fit_envelope, fit_intensity_envelope
from export.errors import ExportError
from export.metrics import output_accuracy, output_auc
from export.onnx_export import EMBEDDING_NAME, INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx
from export.parity import DEFAULT_BOUND, ParityReport, check_parity, cpu_session, run_onnx_outputs
from export.quantize import DEFAULT_AUC_TOLERANCE, QuantizationReport, quantize_gated
from hub.models.registry import DataConfig

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"


@dataclass(frozen=True)
class EvalData:
    """Public, labelled images for the export checks: uint8 (N, H, W) and labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    name: str


@dataclass(frozen=True)
class ExportRequest:
    model_id: str
    model_version: str
    dataset: str
    #: DICOM modalities the model accepts, e.g. ["CR", "DX"] for chest radiographs.
    modalities: list[str]
    classes: list[ClassLabel]
    training: str = "supervised"
    description: str = ""
    #: Metrics of the training run on held-out data (e.g. val_auc), copied into the provenance.
    training_metrics: dict[str, float] = field(default_factory=dict)
    int8: bool = True
    int8_tolerance: float = DEFAULT_AUC_TOLERANCE
    parity_bound: float = DEFAULT_BOUND
    federation: str | None = None
    round: int | None = None
    #: Ship the input envelope (needs the embedding output), fitted on the calibration images.
    envelope: bool = True
    envelope_quantile: float = DEFAULT_QUANTILE
    #: Augmented copies of each calibration image in the envelope's grey-value part (0: the images alone).
    intensity_copies: int = INTENSITY_COPIES


@dataclass(frozen=True)
class ExportReport:
    bundle_dir: Path
    manifest: Manifest
    parity: ParityReport
    fp32_auc: float
    quantization: QuantizationReport | None
    #: File name -> bytes, for every file that shipped.
    sizes: dict[str, int]
    key_fingerprint: str

    @property
    def shipped(self) -> list[str]:
        return [f.path for f in self.manifest.files]


def preprocessing_for(data_config: DataConfig, modalities: Sequence[str]) -> Preprocessing:
    """The manifest's preprocessing: what the edge must do to reproduce ``DataConfig.preprocess``."""
    _, h, w = data_config.input_size
    return Preprocessing(
        modalities=list(modalities),
        voi=["header_window", "bit_depth"],
        size=(h, w),
        interpolation="area" if data_config.interpolation == "area" else "bilinear",
        mean=list(data_config.mean),
        std=list(data_config.std),
    )


def _envelope(
    session: ort.InferenceSession, calibration_x: np.ndarray, data_config: DataConfig, request: ExportRequest
) -> InputEnvelope | None:
    """The input envelope from the fp32 model's embeddings of the calibration (validation) images and from
    those images' grey values, or None with a warning where it cannot be fitted (too few images, too wide an
    embedding)."""
    embedding = run_onnx_outputs(session, calibration_x)[1]
    try:
        envelope = fit_envelope(embedding, quantile=request.envelope_quantile)
        intensity = fit_intensity_envelope(
            grey_of(calibration_x, data_config),
            quantile=request.envelope_quantile,
            copies=request.intensity_copies,
        )
    except ExportError as exc:
        logger.warning("%s ships without an input envelope: %s", request.model_id, exc)
        return None
    return envelope.model_copy(update={"intensity": intensity})


def grey_of(x: np.ndarray, data_config: DataConfig) -> np.ndarray:
    """(N, C, H, W) normalised model input → (N, H, W) grey values in [0, 1] (channel 0, un-normalised)."""
    return np.asarray(x[:, 0], dtype=np.float64) * float(data_config.std[0]) + float(data_config.mean[0])


def _intensity_outside(envelope: InputEnvelope, grey: np.ndarray) -> np.ndarray:
    """(N,) bool: outside the envelope's intensity part (all False without one)."""
    if envelope.intensity is None:
        return np.zeros(len(grey), dtype=bool)
    return IntensityCheck.of(envelope.intensity).judge(grey).outside


def task_spec(data_config: DataConfig, classes: Sequence[ClassLabel]) -> TaskSpec:
    """The manifest's task: binary (one sigmoid logit, class 1 positive) or softmax over K > 2 classes.

    The classes must be the model's: two for one logit, K for K logits, indexed 0..K−1 in order.
    """
    k = data_config.num_outputs
    want = 2 if k == 1 else k
    if [c.index for c in classes] != list(range(want)):
        raise ExportError(
            f"the model emits {k} logit(s), so the bundle needs classes 0..{want - 1} in order; "
            f"got indexes {[c.index for c in classes]}"
        )
    if k == 1:
        return TaskSpec(kind="binary", classes=list(classes), positive_class=1, output_activation="sigmoid")
    return TaskSpec(kind="multiclass", classes=list(classes), output_activation="softmax")


def export_bundle(
    model: nn.Module,
    data_config: DataConfig,
    request: ExportRequest,
    *,
    test: EvalData,
    calibration: EvalData,
    private_key: Ed25519PrivateKey,
    out_dir: Path,
) -> ExportReport:
    """Run the whole export; raises ParityError/QuantizationError/ExportError before anything is published.

    A one-logit model becomes a binary (sigmoid) bundle; a model with K > 1 outputs a K-class bundle whose
    manifest declares softmax over its K classes (the node turns the logits into class probabilities).
    """
    task = task_spec(data_config, request.classes)
    model = model.eval()
    test_x = data_config.preprocess(test.images)  # (N, 1, H, W)
    calibration_x = data_config.preprocess(calibration.images)
    # The embedding output (the final linear layer's input) lets an edge node train that layer without torch.
    linear = final_linear(model, torch.from_numpy(test_x[:2]))
    exported: nn.Module = WithEmbedding(model, linear[1]).eval() if linear is not None else model
    head: HeadSpec | None = None
    with tempfile.TemporaryDirectory(prefix="fedclinic-export-") as tmp:
        work = Path(tmp)
        onnx_file = export_onnx(
            exported, data_config.input_size, work / MODEL_FILE, with_embedding=linear is not None
        )
        parity = check_parity(exported, onnx_file.path, test_x, bound=request.parity_bound)
        fp32 = cpu_session(onnx_file.path)
        outputs = run_onnx_outputs(fp32, test_x)
        fp32_auc = output_auc(test.labels, outputs[0])
        output_specs = [TensorSpec(name=OUTPUT_NAME, shape=onnx_file.output_shape)]
        if linear is not None and onnx_file.embedding_shape is not None:
            check_head(outputs[0], outputs[1], linear[1], bound=request.parity_bound)
            head = head_spec(linear[0], linear[1], EMBEDDING_NAME, OUTPUT_NAME)
            output_specs.append(TensorSpec(name=EMBEDDING_NAME, shape=onnx_file.embedding_shape))
        else:
            logger.warning("%s has no linear layer; exported without an embedding output", request.model_id)
        envelope: InputEnvelope | None = None
        if head is not None and request.envelope:
            envelope = _envelope(fp32, calibration_x, data_config, request)
        files = [BundleFile(onnx_file.path, MODEL_FILE, "model")]
        quant = None
        if request.int8:
            quant = quantize_gated(
                onnx_file.path,
                work / INT8_FILE,
                calibration=calibration_x,
                test_x=test_x,
                test_y=test.labels,
                tolerance=request.int8_tolerance,
            )
            if quant.accepted and quant.path is not None:
                files.append(BundleFile(quant.path, INT8_FILE, "variant", variant="int8"))
        metrics = {**request.training_metrics, f"{test.name}_auc_fp32": fp32_auc}
        if task.kind == "multiclass":
            metrics[f"{test.name}_accuracy_fp32"] = output_accuracy(test.labels, outputs[0])
        if quant is not None:
            metrics[f"{test.name}_auc_int8"] = quant.int8_auc
            if quant.int8_accuracy is not None:
                metrics[f"{test.name}_accuracy_int8"] = quant.int8_accuracy
        if envelope is not None:
            # As a node judges: outside the embedding part or the intensity part (the same for both variants).
            check = EnvelopeCheck.of(envelope)
            grey_outside = _intensity_outside(envelope, grey_of(test_x, data_config))
            metrics[f"{test.name}_outside_intensity"] = float(grey_outside.mean())
            outside = check.outside(outputs[1]) | grey_outside
            metrics[f"{test.name}_outside_envelope_fp32"] = float(outside.mean())
            if quant is not None and quant.accepted and quant.path is not None:
                int8_embedding = run_onnx_outputs(cpu_session(quant.path), test_x)[1]
                outside = check.outside(int8_embedding) | grey_outside
                metrics[f"{test.name}_outside_envelope_int8"] = float(outside.mean())
        c, h, w = data_config.input_size
        manifest = write_bundle(
            out_dir,
            files,
            model_id=request.model_id,
            model_version=request.model_version,
            description=request.description,
            task=task,
            io=IOSpec(
                inputs=[TensorSpec(name=INPUT_NAME, shape=[-1, c, h, w])],
                outputs=output_specs,
            ),
            head=head,
            envelope=envelope,
            preprocessing=preprocessing_for(data_config, request.modalities),
            provenance=Provenance(
                training=request.training,
                dataset=request.dataset,
                federation=request.federation,
                round=request.round,
                metrics=metrics,
                parity_max_abs_diff=parity.max_abs_diff,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            ),
            producer=producer_info(OPSET),
            private_key=private_key,
        )
    sizes = {f.path: f.size for f in manifest.files}
    return ExportReport(
        bundle_dir=out_dir,
        manifest=manifest,
        parity=parity,
        fp32_auc=fp32_auc,
        quantization=quant,
        sizes=sizes,
        key_fingerprint=fingerprint(private_key.public_key()),
    )
