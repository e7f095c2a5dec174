"""`fedclinic-hub export`: checkpoint -> parity-checked ONNX (+ gated int8) -> signed bundle (folder, zip).

Everything that can be checked cheaply (the output is new, the version is semantic, the key is the private
one, ONNX Runtime is installed) is checked before torch loads or any work starts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from export.errors import ExportError, KeyFileError
from export.semver import check_semver
from export.signing import load_private_key, load_public_key_file
from hub.commands.output import EXIT_FAILED, FormatOption, OutputFormat, emit

if TYPE_CHECKING:
    from edge_node.protocol.manifest import ClassLabel
    from export.pipeline import ExportReport

#: DICOM modalities each dataset's images come from: the edge skips other modalities.
DATASET_MODALITIES = {"pneumoniamnist": ["CR", "DX"], "breastmnist": ["US"], "retinamnist": ["OP"]}
#: Coded concepts for the SR finding of the positive class.
POSITIVE_CODES = {"pneumoniamnist": ("233604007", "SCT", "Pneumonia")}
#: fedclinic's own coding scheme (a "99" private designator: the SR declares it in its
#: CodingSchemeIdentificationSequence) for the grades of the International Clinical DR severity scale.
FEDCLINIC_SCHEME = "99FEDCLINIC"
#: A coded concept for every class of a K-class dataset, by class index.
CLASS_CODES: dict[str, list[tuple[str, str, str]]] = {
    "retinamnist": [
        ("DR0", FEDCLINIC_SCHEME, "No diabetic retinopathy"),
        ("DR1", FEDCLINIC_SCHEME, "Mild non-proliferative diabetic retinopathy"),
        ("DR2", FEDCLINIC_SCHEME, "Moderate non-proliferative diabetic retinopathy"),
        ("DR3", FEDCLINIC_SCHEME, "Severe non-proliferative diabetic retinopathy"),
        ("DR4", FEDCLINIC_SCHEME, "Proliferative diabetic retinopathy"),
    ]
}


def class_labels(dataset: str, labels: tuple[str, ...]) -> list[ClassLabel]:
    """The manifest's classes: the checkpoint's label names, each with its coded concept where one is known
    (every class of a K-class dataset; the positive class of a binary one)."""
    from edge_node.protocol.manifest import ClassLabel

    codes: dict[int, tuple[str, str, str]] = dict(enumerate(CLASS_CODES.get(dataset, [])))
    if dataset in POSITIVE_CODES:
        codes[1] = POSITIVE_CODES[dataset]
    out = []
    for index, name in enumerate(labels):
        code = codes.get(index) if len(labels) == len(codes) or dataset in POSITIVE_CODES else None
        if code is not None:
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
    int8_tolerance: float | None = None,
    data_root: Path | None = None,
    training: str = "supervised",
    federation: str | None = None,
    round_number: int | None = None,
    envelope_copies: int | None = None,
) -> ExportReport:
    """Export a training checkpoint as a signed bundle, checked on the dataset's real test split; int8 is
    calibrated on the val split (public data) and shipped only within ``int8_tolerance`` AUC of fp32
    (default: the pipeline's ``DEFAULT_AUC_TOLERANCE``). ``training``, ``federation`` and ``round_number``
    go into the manifest's provenance. ``envelope_copies`` overrides how many augmented copies of each
    validation image widen the envelope's grey-value part (default ``INTENSITY_COPIES``)."""
    from export.envelope import INTENSITY_COPIES
    from export.pipeline import EvalData, ExportRequest, export_bundle
    from export.quantize import DEFAULT_AUC_TOLERANCE
    from hub.data.medmnist import load_medmnist
    from hub.training.checkpoint import load_checkpoint

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
        int8_tolerance=DEFAULT_AUC_TOLERANCE if int8_tolerance is None else int8_tolerance,
        training=training,
        federation=federation,
        round=round_number,
        intensity_copies=INTENSITY_COPIES if envelope_copies is None else envelope_copies,
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


def zip_path_for(out: Path) -> Path:
    """Where ``--zip`` writes the zip bundle: beside the bundle folder, named after it."""
    return out.with_name(out.name + ".zip")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_request(checkpoint: Path, key: Path, out: Path, model_version: str, *, zipped: bool) -> None:
    """Refuse, before any work, what would make the export fail or clobber something (typer.BadParameter)."""
    try:
        check_semver(model_version)
    except ExportError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model-version") from None
    for target in (out, zip_path_for(out)) if zipped else (out,):
        if target.exists():
            raise typer.BadParameter(
                f"{target} already exists; bundles are immutable: choose a new --out or --model-version",
                param_hint="--out",
            )
    if not (checkpoint / "config.json").is_file():
        raise typer.BadParameter(
            f"{checkpoint} is not a checkpoint folder (no config.json); pass e.g. runs/student/best",
            param_hint="--checkpoint",
        )
    try:
        load_private_key(key)
    except KeyFileError as exc:
        try:
            load_public_key_file(key)
        except KeyFileError:
            raise typer.BadParameter(str(exc), param_hint="--key") from None
        raise typer.BadParameter(
            f"{key} is the public key, which edge nodes hold to verify bundles; signing needs the private "
            f"key beside it (hub.key, created by `fedclinic-hub keys create`)",
            param_hint="--key",
        ) from None
    if not installed("onnxruntime"):
        raise typer.BadParameter(
            "export checks the ONNX model with ONNX Runtime, which is not installed: "
            "pip install 'fedclinic[hub,cpu]' (or 'fedclinic[hub,gpu]' on a CUDA machine; never both)",
            param_hint="--checkpoint",
        )


def report_json(report: ExportReport, zipped: Path | None) -> dict[str, Any]:
    """The export's outcome as JSON (``--format json``)."""
    q = report.quantization
    return {
        "bundle": str(report.bundle_dir),
        "zip": None if zipped is None else str(zipped),
        "model_id": report.manifest.model_id,
        "model_version": report.manifest.model_version,
        "parity": {
            "max_abs_diff": report.parity.max_abs_diff,
            "bound": report.parity.bound,
            "images": report.parity.num_images,
        },
        "test_auc_fp32": report.fp32_auc,
        "int8": None if q is None else {"test_auc": q.int8_auc, "shipped": q.accepted, "reason": q.reason},
        "envelope": envelope_json(report),
        "sizes": report.sizes,
        "shipped": report.shipped,
        "key_fingerprint": report.key_fingerprint,
    }


def envelope_json(report: ExportReport) -> dict[str, Any] | None:
    """The bundle's input envelope in brief: how it was fitted and how much of the test split is outside."""
    env = report.manifest.envelope
    if env is None:
        return None
    return {
        "quantile": env.quantile,
        "fitted_on": env.fitted_on,
        "folds": env.folds,
        "test_outside": report.manifest.provenance.metrics.get("test_outside_envelope_fp32"),
        "intensity": env.intensity is not None,
        "test_outside_intensity": report.manifest.provenance.metrics.get("test_outside_intensity"),
        "augmented_copies": None if env.intensity is None else env.intensity.augmented_copies,
    }


def write_zip(bundle_dir: Path, zip_path: Path) -> Path:
    """The bundle folder packed into ``zip_path``, written under a temporary name and renamed."""
    from export.bundle_writer import zip_bundle

    partial = zip_path.with_name(zip_path.name + ".partial")
    try:
        zip_bundle(bundle_dir, partial)
        partial.replace(zip_path)
    finally:
        partial.unlink(missing_ok=True)
    return zip_path


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
        float | None,
        typer.Option(
            "--int8-tolerance",
            help="Ship int8 only if its test AUC is at most this below fp32 (default 0.01).",
        ),
    ] = None,
    zipped: Annotated[
        bool, typer.Option("--zip", help="Also write the bundle as OUT.zip, one file to copy to clinics.")
    ] = False,
    envelope_copies: Annotated[
        int | None,
        typer.Option(
            "--envelope-copies",
            min=0,
            help="Augmented copies of each validation image in the envelope's grey-value part (default 4; "
            "0 when the validation images already span the clinics' scanners: docs/envelope.md).",
        ),
    ] = None,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Export a checkpoint as a signed model bundle (ONNX + manifest + signature) for edge nodes.

    Example: fedclinic-hub export --checkpoint runs/student/best --key keys/hub.key
    --out bundles/pneumonia-1.0.0 --model-version 1.0.0 --zip
    """
    check_request(checkpoint, key, out, model_version, zipped=zipped)
    from hub.training.checkpoint import CheckpointError  # torch loads only now that the work starts

    console = Console(stderr=output is OutputFormat.json)
    try:
        report = build_bundle(
            checkpoint,
            key,
            out,
            model_version=model_version,
            model_id=model_id,
            int8=int8,
            int8_tolerance=int8_tolerance,
            envelope_copies=envelope_copies,
        )
        zip_file = write_zip(report.bundle_dir, zip_path_for(out)) if zipped else None
    except (ExportError, CheckpointError, OSError) as exc:
        console.print(f"[red]export failed:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from exc

    def render(out: Console) -> None:
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
        env = envelope_json(report)
        if env is None:
            table.add_row("input envelope", "none (no embedding output, or too few validation images)")
        else:
            expected = (2 if env["intensity"] else 1) * (1 - env["quantile"])
            table.add_row(
                "input envelope",
                f"{env['test_outside']:.1%} of test images outside (expected {expected:.0%}; "
                f"fitted on {env['fitted_on']} validation images, threshold cross-fitted in {env['folds']} "
                "folds)",
            )
            if env["test_outside_intensity"] is not None:
                table.add_row(
                    "  its grey-value part",
                    f"{env['test_outside_intensity']:.1%} outside (widened by {env['augmented_copies']} "
                    "augmented copies of each validation image)",
                )
        for name, size in report.sizes.items():
            table.add_row(f"size {name}", f"{size / 1024:.1f} KiB")
        table.add_row("shipped", ", ".join(report.shipped))
        if zip_file is not None:
            table.add_row("zip", str(zip_file))
        table.add_row("signed by", report.key_fingerprint)
        out.print(table)

    emit(output, report_json(report, zip_file), render)
