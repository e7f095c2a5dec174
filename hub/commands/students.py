"""`fedclinic-hub distill` and `models from-round`: the next student, exported, signed, published.

Both end the same way: the student's held-out metrics (the dataset's public validation split) → a new
checkpoint → a parity-checked bundle signed with the hub's key, whose manifest carries the provenance
(how it was trained, the federation, the round, the held-out metrics) → optionally a publication.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from export.errors import ExportError
from export.semver import check_semver
from hub.commands.export_bundle import installed
from hub.commands.output import EXIT_FAILED, EXIT_USAGE, FormatOption, OutputFormat, emit, fail
from hub.commands.service_options import DataDirOption, hub_database, settings_for

if TYPE_CHECKING:
    import numpy as np
    from sqlalchemy.orm import Session
    from torch import nn

    from hub.service.settings import HubSettings
    from hub.store.schema import Node, Round
    from hub.training.checkpoint import CheckpointConfig

__all__ = ["distill", "from_round"]

OutOption = Annotated[
    Path, typer.Option("--out", help="New folder for the student: OUT/checkpoint and OUT/bundle.")
]
VersionOption = Annotated[str, typer.Option("--model-version", help="Semantic version of the student.")]
ModelIdOption = Annotated[
    str | None, typer.Option("--model-id", help="Model id (default: <dataset>-<model>).")
]
PublishOption = Annotated[
    bool, typer.Option("--publish/--no-publish", help="Publish the signed bundle to --cohort.")
]
CohortOption = Annotated[str, typer.Option("--cohort", help="The cohort that gets the published student.")]
Int8Option = Annotated[bool, typer.Option("--int8/--no-int8", help="Try a static int8 variant.")]
FederationOption = Annotated[
    str | None,
    typer.Option("--federation", help="Federation named in the provenance (default: the hub's public URL)."),
]


@dataclass(frozen=True)
class StudentJob:
    """What every student command shares: where it goes, how it is named, signed and published."""

    out: Path
    model_version: str
    model_id: str | None
    publish: bool
    cohort: str
    int8: bool
    federation: str | None
    #: Publish to these nodes of the cohort only (None: the whole cohort).
    nodes: list[str] | None = None


def _check(job: StudentJob) -> None:
    """Refuse, before torch loads, what would make the export fail or overwrite something."""
    try:
        check_semver(job.model_version)
    except ExportError as exc:
        fail(str(exc), EXIT_USAGE)
    if job.out.exists():
        fail(f"{job.out} already exists; students are immutable: choose a new --out", EXIT_USAGE)
    if not installed("onnxruntime"):
        fail("the export checks the model with ONNX Runtime: pip install 'fedclinic[hub,cpu]'", EXIT_USAGE)


def _progress(fmt: OutputFormat) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=Console(stderr=fmt is OutputFormat.json),
        transient=fmt is OutputFormat.json,
    )


def _finish(
    job: StudentJob,
    settings: HubSettings,
    model: nn.Module,
    base: CheckpointConfig,
    *,
    training: str,
    round_number: int | None,
    source: str,
    progress: Progress,
) -> dict[str, Any]:
    """Held-out metrics → checkpoint → signed bundle (→ publication); the report as JSON."""
    from hub.commands.export_bundle import build_bundle
    from hub.service.datadir import SIGNING_KEY, load_signing_key
    from hub.service.publishing import publish_bundle
    from hub.training.student import held_out_metrics, save_derived

    step = progress.add_task("evaluate on held-out data", total=1)
    metrics = held_out_metrics(model, base.data_config, base.dataset)
    progress.update(step, advance=1)
    checkpoint = save_derived(job.out / "checkpoint", model, base, metrics, source)
    step = progress.add_task("export, check parity, sign", total=1)
    federation = job.federation or settings.public_url or None
    report = build_bundle(
        checkpoint,
        settings.keys_dir / SIGNING_KEY,
        job.out / "bundle",
        model_version=job.model_version,
        model_id=job.model_id,
        int8=job.int8,
        training=training,
        federation=federation,
        round_number=round_number,
    )
    progress.update(step, advance=1)
    publication = None
    if job.publish:
        to = f"node {job.nodes[0]} of cohort {job.cohort}" if job.nodes else f"cohort {job.cohort}"
        step = progress.add_task(f"publish to {to}", total=1)
        with hub_database(settings) as db:
            signed = publish_bundle(
                db,
                load_signing_key(settings),
                settings.artifacts_dir,
                report.bundle_dir,
                cohort=job.cohort,
                ttl_days=settings.publication_ttl_days,
                actor="cli",
                nodes=job.nodes,
            )
        publication = signed.record.publication_id
        progress.update(step, advance=1)
    manifest = report.manifest
    return {
        "checkpoint": str(checkpoint),
        "bundle": str(report.bundle_dir),
        "model_id": manifest.model_id,
        "model_version": manifest.model_version,
        "provenance": manifest.provenance.model_dump(mode="json"),
        "parity_max_abs_diff": report.parity.max_abs_diff,
        "publication_id": publication,
        "key_fingerprint": report.key_fingerprint,
    }


def _render(title: str, result: dict[str, Any]) -> Any:
    def render(console: Console) -> None:
        table = Table(title=title, show_header=False)
        prov = result["provenance"]
        table.add_row("bundle", result["bundle"])
        table.add_row("model", f"{result['model_id']} {result['model_version']}")
        table.add_row("training", str(prov.get("training")))
        table.add_row("federation / round", f"{prov.get('federation') or '-'} / {prov.get('round') or '-'}")
        for name, value in sorted(prov.get("metrics", {}).items()):
            table.add_row(name, f"{value:.4f}")
        table.add_row("parity max |diff|", f"{result['parity_max_abs_diff']:.2e}")
        table.add_row("published", result["publication_id"] or "no")
        table.add_row("signed by", result["key_fingerprint"])
        console.print(table)

    return render


def _published_round(session: Session, number: int) -> Round:
    """Round ``number``, which must be published with an aggregate."""
    from sqlalchemy import select

    from hub.store.schema import Round

    row = session.scalars(select(Round).where(Round.number == number)).first()
    if row is None:
        fail(f"there is no round {number}; see `fedclinic-hub rounds list`")
    if row.state != "published" or row.result_artifact is None:
        fail(f"round {number} is {row.state}; only a published round has an aggregate")
    return row


def _kept_tensors(session: Session, number: int, node: Node | None, deployed: int) -> dict[str, np.ndarray]:
    """From kept_tensors round ``number``: the nodes' mean of what they kept, or ``node``'s own copy. A node
    whose learner was last trained by another round than ``deployed`` is named on stderr (its tensors go with
    other weights than the round's); the operator decides."""
    from sqlalchemy import select

    from hub.rounds.kept_plans import (
        KeptTensorsCollection,
        answered,
        mean_part,
        node_part,
        trained_rounds,
    )
    from hub.store.artifacts import load_tensors
    from hub.store.schema import Node

    row = _published_round(session, number)
    if row.strategy != KeptTensorsCollection.name:
        fail(f"round {number} is a {row.strategy} round; --kept-from names a kept_tensors round")
    assert row.result_artifact is not None  # checked by _published_round
    aggregate = load_tensors(session, row.result_artifact)
    own = node_part(aggregate, node.id) if node is not None else {}
    if node is not None and not own:
        fail(f"node {node.name} ({node.id}) did not answer kept_tensors round {number}")
    trained = trained_rounds(aggregate)
    nodes = answered(aggregate)
    names = dict(session.execute(select(Node.id, Node.name).where(Node.id.in_(nodes))).tuples().all())
    console = Console(stderr=True)
    for node_id in nodes if node is None else [node.id]:
        if trained.get(node_id) != deployed:
            said = f"round {trained[node_id]}" if node_id in trained else "a round it did not name"
            console.print(
                f"warning: node {names.get(node_id, node_id)} kept these tensors from its training in "
                f"{said}, not round {deployed}",
                style="yellow", markup=False, highlight=False, soft_wrap=True,
            )  # fmt: skip
    return own if node is not None else mean_part(aggregate)


def from_round(
    round_number: Annotated[int, typer.Argument(metavar="ROUND", help="Number of a published round.")],
    student: Annotated[
        Path, typer.Option("--student", help="Checkpoint folder of the student the round trained.")
    ],
    out: OutOption,
    model_version: VersionOption,
    data_dir: DataDirOption = None,
    model_id: ModelIdOption = None,
    publish: PublishOption = False,
    cohort: CohortOption = "default",
    int8: Int8Option = True,
    federation: FederationOption = None,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            help="pFedNet: the student with this node's own personal part (node id or name); with "
            "--kept-from, with the tensors this node kept. Published to that node alone, in its cohort.",
        ),
    ] = None,
    kept_from: Annotated[
        int | None,
        typer.Option(
            "--kept-from",
            metavar="ROUND",
            help="A published kept_tensors round: the tensors the strategy left at the nodes (FedBN's "
            "normalisation tensors), their mean, or --node's own.",
        ),
    ] = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Apply a round's aggregate (the whole student, or a part such as its head) to the student, then
    export, sign and (with --publish) publish it; the manifest names the federation and the round.

    A pFedNet round's aggregate carries the clinics' mean personal part; with --node the student takes that
    node's own personal part from the round's saved state instead, and only that node is sent it.

    A strategy that leaves tensors at the nodes (FedBN's normalisation tensors, pFedNet's with local=…)
    publishes rounds without them: collect them first with a kept_tensors round and name it with
    --kept-from (the nodes' mean, or with --node that node's own); without it such a round is refused.

    Example: fedclinic-hub models from-round 3 --student runs/student/best --out students/r3
    --model-version 1.1.0 --publish
    """
    settings = settings_for(data_dir)
    from sqlalchemy import or_, select

    from edge_node.protocol.tensors import decode_tensors
    from hub.fl.errors import StrategyConfigError
    from hub.fl.fedbn import KEPT_AT_NODES, kept_at_nodes
    from hub.fl.pfednet import PFedNet
    from hub.fl.state import is_saved_state, state_from_arrays
    from hub.store.artifacts import load_tensors
    from hub.store.schema import Node

    target: list[str] | None = None
    with hub_database(settings) as db, db.session() as session:
        row = _published_round(session, round_number)
        assert row.result_artifact is not None  # checked by _published_round
        tensors = load_tensors(session, row.result_artifact)
        strategy = row.strategy
        found = None
        if node is not None:
            found = session.scalars(select(Node).where(or_(Node.id == node, Node.name == node))).first()
            if found is None:
                fail(f"there is no node {node!r}; see `fedclinic-hub nodes list`")
            target, cohort = [found.id], found.cohort
        saved = decode_tensors(row.strategy_state) if row.strategy_state is not None else {}
        if found is not None and strategy == PFedNet.name and is_saved_state(saved):
            try:
                tensors.update(PFedNet.personal_in_state(state_from_arrays(saved), found.id))
            except StrategyConfigError as exc:
                fail(f"round {round_number} holds no personal part of node {node}: {exc}")
        elif found is not None and kept_from is None:
            fail(
                f"round {round_number} ({strategy}) keeps no part per node: --node is for pFedNet rounds, "
                "or for the tensors the nodes kept (--kept-from)"
            )
        if kept_from is not None:  # only what the round's aggregate lacks: the round's own tensors win
            tensors = {**_kept_tensors(session, kept_from, found, round_number), **tensors}
        kept = kept_at_nodes(strategy, row.config) if kept_from is None else None
    job = StudentJob(out, model_version, model_id, publish, cohort, int8, federation, target)
    _check(job)
    from hub.training.checkpoint import CheckpointError, load_checkpoint
    from hub.training.student import AggregateMismatchError, apply_aggregate

    with _progress(fmt) as progress:
        step = progress.add_task(f"apply round {round_number}'s aggregate", total=1)
        try:
            ckpt = load_checkpoint(student)
            model = ckpt.build_model()
            left = sorted(
                n for n in model.state_dict() if kept and KEPT_AT_NODES[kept](n) and n not in tensors
            )
            if left:
                fail(
                    f"round {round_number} ({strategy}) left {len(left)} tensors at the nodes ({left[0]}, "
                    "…), so its aggregate alone would give the student its starting model's: collect them "
                    f"with `fedclinic-hub rounds start --strategy kept_tensors --config kept={kept} --model "
                    "STUDENT.npz` and pass that round as --kept-from"
                )
            applied = apply_aggregate(model, tensors)
        except (CheckpointError, AggregateMismatchError) as exc:
            fail(f"round {round_number} cannot update {student}: {exc}")
        except RuntimeError as exc:  # torch's words for weights that do not fit the checkpoint's model
            fail(f"the student checkpoint {student} does not load: {str(exc).splitlines()[0]}")
        progress.update(step, advance=1)
        try:
            result = _finish(
                job,
                settings,
                model,
                ckpt.config,
                training=f"federated:{strategy}",
                round_number=round_number,
                source=f"round {round_number} ({strategy}, {len(applied)} tensors"
                + (f", node {target[0]}'s own part" if target else "")
                + (f", the nodes' kept tensors from round {kept_from}" if kept_from is not None else "")
                + f") on {student}",
                progress=progress,
            )
        except (ExportError, OSError, ValueError) as exc:
            fail(f"the student could not be exported: {exc}", EXIT_FAILED)
    result["tensors_applied"] = len(applied)
    emit(fmt, result, _render(f"student from round {round_number}", result))


def distill(
    teacher: Annotated[Path, typer.Option("--teacher", help="Checkpoint folder of the teacher.")],
    out: OutOption,
    model_version: VersionOption,
    data_dir: DataDirOption = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the transfer set.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Student initialisation and batch order.")] = 0,
    temperature: Annotated[float, typer.Option("--temperature", min=0.1, help="KD temperature T.")] = 2.0,
    transfer_limit: Annotated[
        int | None, typer.Option("--transfer-limit", min=1, help="Use only the first N transfer images.")
    ] = None,
    round_number: Annotated[
        int | None, typer.Option("--round", help="The round the teacher came from (provenance).")
    ] = None,
    model_id: ModelIdOption = None,
    publish: PublishOption = False,
    cohort: CohortOption = "default",
    int8: Int8Option = True,
    federation: FederationOption = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Distill a teacher into the compact student (≤ 1 M parameters) on the public transfer set (the
    teacher's dataset's train split: no labels used), then export, sign and (with --publish) publish it.

    Example: fedclinic-hub distill --teacher runs/teacher/best --out students/d1 --model-version 2.0.0
    """
    job = StudentJob(out, model_version, model_id, publish, cohort, int8, federation)
    _check(job)
    settings = settings_for(data_dir)
    import torch

    from hub.data.medmnist import load_medmnist
    from hub.training.checkpoint import CheckpointError, load_checkpoint
    from hub.training.datasets import NORM_MEAN, NORM_STD
    from hub.training.distill import distill_student, student_config

    try:
        ckpt = load_checkpoint(teacher)
        net = ckpt.build_model()
    except CheckpointError as exc:
        fail(str(exc), EXIT_USAGE)
    except RuntimeError as exc:  # torch's words for weights that do not fit the checkpoint's model
        fail(f"the teacher checkpoint {teacher} does not load: {str(exc).splitlines()[0]}", EXIT_USAGE)
    cfg = ckpt.config
    if tuple(cfg.data_config.mean) != (NORM_MEAN,) or tuple(cfg.data_config.std) != (NORM_STD,):
        fail(
            f"the teacher normalises with mean {cfg.data_config.mean} / std {cfg.data_config.std}; the "
            f"student is distilled on (x − {NORM_MEAN}) / {NORM_STD}"
        )
    transfer = load_medmnist(cfg.dataset, "train")
    images = transfer.images[:transfer_limit] if transfer_limit else transfer.images
    x01 = torch.from_numpy(images.astype("float32")[:, None] / 255.0)  # (N, 1, H, W) in [0, 1]
    source = f"distilled from {teacher} ({cfg.model_name}) on {cfg.dataset} train, T={temperature}"
    with _progress(fmt) as progress:
        step = progress.add_task(f"distill on {len(x01)} public images", total=epochs)
        student = distill_student(
            net,
            x01,
            epochs=epochs,
            seed=seed,
            temperature=temperature,
            on_epoch=lambda done, total: progress.update(step, completed=done, total=total),
        )
        try:
            result = _finish(
                job,
                settings,
                student,
                student_config(cfg.dataset, {}, source=source),
                training="distilled",
                round_number=round_number,
                source=source,
                progress=progress,
            )
        except (ExportError, OSError, ValueError) as exc:
            fail(f"the student could not be exported: {exc}", EXIT_FAILED)
    emit(fmt, result, _render("distilled student", result))
