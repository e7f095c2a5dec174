"""`fedclinic-hub export`: checkpoint -> parity-checked ONNX (+ gated int8) -> signed bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edge_node.protocol.manifest import ClassLabel
from export.errors import ExportError
from export.pipeline import EvalData, ExportReport, ExportRequest, export_bundle
from export.quantize import DEFAULT_AUC_TOLERANCE
from export.signing import load_private_key
from hub.data.medmnist import load_medmnist
from hub.training.checkpoint import CheckpointError, load_checkpoint

#: DICOM modalities each dataset's images come from: the edge skips other modalities.
DATASET_MODALITIES = {"pneumoniamnist": ["CR", "DX"], "breastmnist": ["US"], "retinamnist": ["OP"]}
#: Coded concepts for the SR finding of the positive class.
POSITIVE_CODES = {"pneumoniamnist": ("233604007", "SCT", "Pneumonia")}


def class_labels(dataset: str, labels: tuple[str, ...]) -> list[ClassLabel]:
    code = POSITIVE_CODES.get(dataset)
    out = []
    for index, name in enumerate(labels):
        if index == 1 and code is not None:
            out.append(
                ClassLabel(
                    index=index, name=name, code_value=code[0], code_scheme=code[1], code_meaning=code[2]
                )
            )
        else:
            out.append(ClassLabel(index=index, name=name))
    return out


def build_bundle(
    checkpoint: Path,
    key: Path,
    out: Path,
    *,
    model_version: str,
    model_id: str | None = None,
    int8: bool = True,
    int8_tolerance: float = DEFAULT_AUC_TOLERANCE,
    data_root: Path | None = None,
) -> ExportReport:
    """Export a training checkpoint as a signed bundle, checked on the dataset's real test split; int8 is
    calibrated on the val split (public data) and shipped only within ``int8_tolerance`` AUC of fp32."""
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    if cfg.dataset not in DATASET_MODALITIES:
        raise ExportError(f"no DICOM modality mapping for dataset {cfg.dataset!r}")
    test = load_medmnist(cfg.dataset, "test", data_root)
    val = load_medmnist(cfg.dataset, "val", data_root)
    request = ExportRequest(
        model_id=model_id or f"{cfg.dataset.removesuffix('mnist')}-{cfg.model_name}",
        model_version=model_version,
        dataset=cfg.dataset,
        modalities=DATASET_MODALITIES[cfg.dataset],
        classes=class_labels(cfg.dataset, cfg.data_config.labels),
        description=f"{cfg.model_name} trained on {cfg.dataset} (epoch {cfg.epoch})",
        training_metrics={k: v for k, v in cfg.metrics.items() if k.startswith("val_")},
        int8=int8,
        int8_tolerance=int8_tolerance,
    )
    return export_bundle(
        ckpt.build_model(),
        cfg.data_config,
        request,
        test=EvalData(test.images, test.labels, "test"),
        calibration=EvalData(val.images, val.labels, "val"),
        private_key=load_private_key(key),
        out_dir=out,
    )


def export(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder, e.g. runs/x/best.")],
    key: Annotated[Path, typer.Option("--key", help="Private signing key (hub.key).")],
    out: Annotated[Path, typer.Option("--out", help="New bundle folder, e.g. bundles/pneumonia-1.0.0.")],
    model_version: Annotated[str, typer.Option("--model-version", help="Semantic version of this model.")],
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="Model id (default: <dataset>-<model>).")
    ] = None,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Try a static int8 variant.")] = True,
    int8_tolerance: Annotated[
        float,
        typer.Option("--int8-tolerance", help="Ship int8 only if its test AUC is at most this below fp32."),
    ] = DEFAULT_AUC_TOLERANCE,
) -> None:
    """Export a checkpoint as a signed model bundle (ONNX + manifest + signature) for edge nodes."""
    console = Console()
    try:
        report = build_bundle(
            checkpoint,
            key,
            out,
            model_version=model_version,
            model_id=model_id,
            int8=int8,
            int8_tolerance=int8_tolerance,
        )
    except (ExportError, CheckpointError, FileNotFoundError) as exc:
        console.print(f"[red]export failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    m = report.manifest
    table = Table(title=f"bundle {m.model_id} {m.model_version}", show_header=False)
    table.add_row("folder", str(report.bundle_dir))
    table.add_row(
        "parity (ORT vs torch)",
        f"max |diff| {report.parity.max_abs_diff:.2e} on "
        f"{report.parity.num_images} test images (bound {report.parity.bound:.0e})",
    )
    table.add_row("test AUC fp32", f"{report.fp32_auc:.4f}")
    q = report.quantization
    if q is None:
        table.add_row("int8", "not requested")
    else:
        verdict = "[green]shipped[/green]" if q.accepted else "[yellow]not shipped[/yellow]"
        table.add_row("test AUC int8", f"{q.int8_auc:.4f} ({verdict}: {q.reason})")
    for name, size in report.sizes.items():
        table.add_row(f"size {name}", f"{size / 1024:.1f} KiB")
    table.add_row("shipped", ", ".join(report.shipped))
    table.add_row("signed by", report.key_fingerprint)
    console.print(table)
