"""`fedclinic-hub envelope start|threshold|build`: fit a bundle's input envelope on the nodes' own images.

The exporter fits a bundle's envelope on the hub's validation images, which come from fewer scanners than
the federation's. These commands refit it where the images are, without moving them: ``start`` opens the
round that collects the sums of each node's analysed images' features, ``threshold`` the round that counts
their held-out distances, and ``build`` signs the same model files with the envelope both rounds give, as a
new version (docs/envelope.md, "Fitted by the federation").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from edge_node.protocol.wire import RoundInfo, RoundStart
from hub.commands.output import EXIT_FAILED, FormatOption, OutputFormat, emit, fail
from hub.commands.service_options import (
    DataDirOption,
    ExcludeNodesOption,
    hub_database,
    settings_for,
    taking_part,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from edge_node.protocol.bundle import VerifiedBundle
    from edge_node.protocol.manifest import InputEnvelope, IntensityEnvelope
    from hub.rounds.envelope_influence import AnswerAudit
    from hub.service.settings import HubSettings

app = typer.Typer(
    help="Refit a bundle's input envelope on the nodes' own images (two rounds, then a new bundle).",
    no_args_is_help=True,
)

#: Below this many nodes, honest clinics unlike the others were often named by `build` in the benchmark
#: (docs/benchmarks.md, "One hostile node in the envelope rounds"); its warnings say so.
FEW_NODES = 6

NodesOption = Annotated[
    list[str] | None, typer.Option("--node", help="Node id taking part (repeat); default all.")
]
MinResultsOption = Annotated[int, typer.Option("--min-results", "-k", min=1, help="Results needed (k of n).")]
DeadlineOption = Annotated[float, typer.Option("--deadline", help="Seconds the round collects.")]


def _verified(bundle: Path, settings: HubSettings) -> VerifiedBundle:
    from edge_node.protocol.bundle import verify_bundle
    from edge_node.protocol.errors import BundleError
    from hub.service.datadir import public_key

    try:
        return verify_bundle(bundle, [public_key(settings)])
    except BundleError as exc:
        fail(f"{bundle} does not verify with this hub's key: {exc}")


def _open(request: RoundStart, settings: HubSettings) -> RoundInfo:
    from hub.rounds.controller import RoundController

    with hub_database(settings) as db:
        try:
            return RoundController(db, settings).start(request, actor="cli")
        except ValueError as exc:
            fail(str(exc))


def _round_table(info: RoundInfo) -> Table:
    table = Table(title="envelope round")
    for col in ("#", "id", "strategy", "state", "nodes", "k"):
        table.add_column(col)
    table.add_row(
        str(info.round),
        info.round_id,
        info.strategy,
        info.state.value,
        str(len(info.nodes)),
        str(info.min_results),
    )
    return table


@app.command("start")
def start(
    bundle: Annotated[
        Path, typer.Option("--bundle", help="The published bundle whose envelope is refitted.")
    ],
    data_dir: DataDirOption = None,
    folds: Annotated[
        int, typer.Option("--folds", min=2, max=20, help="Folds of the held-out threshold.")
    ] = 5,
    nodes: NodesOption = None,
    exclude: ExcludeNodesOption = None,
    min_results: MinResultsOption = 1,
    deadline: DeadlineOption = 3600.0,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Open round one: each node serving BUNDLE sends the per-fold sums of the features it kept of the images
    it analysed with it (at least 10 images per sum; a node with fewer refuses, saying so). To compare an
    envelope with one without a node that `build` named, run both rounds again with --exclude-node."""
    from edge_node.protocol.envelope_rounds import EnvelopeRounds

    settings = settings_for(data_dir)
    if exclude:
        with hub_database(settings) as db:
            nodes = taking_part(db, nodes, exclude)
    manifest = _verified(bundle, settings).manifest
    if manifest.head is None:
        fail(f"{manifest.model_id} {manifest.model_version} has no embedding output, so no envelope to refit")
    envelope = manifest.envelope
    levels = envelope.intensity.levels if envelope is not None and envelope.intensity is not None else None
    if levels is None:
        fail(
            f"{manifest.model_id} {manifest.model_version} has no grey-value envelope, so its nodes kept no "
            "grey-value features: export the model again (`fedclinic-hub export` fits one), publish it, and "
            "refit that"
        )
    try:
        rounds = EnvelopeRounds(
            manifest.model_id, manifest.model_version, manifest.head.embedding_dim, tuple(levels), folds
        )
    except ValueError as exc:
        fail(str(exc))
    request = RoundStart(
        strategy="envelope_moments",
        config=dict(rounds.to_config()),
        nodes=nodes or [],
        min_results=min_results,
        deadline_s=deadline,
    )
    # What stands in the way at each node, as far as its last heartbeat says: on stderr, in both formats
    # (stdout stays the round's JSON for scripts); the round opens all the same, the operator decides.
    console = Console(stderr=True)
    for warning in _node_warnings(settings, nodes or [], manifest.model_id, manifest.model_version, folds):
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    info = _open(request, settings)
    emit(fmt, info, lambda console: console.print(_round_table(info)))


def _node_warnings(
    settings: HubSettings, nodes: list[str], model_id: str, model_version: str, folds: int
) -> list[str]:
    """One line per node of an envelope_moments round about ``model_id`` ``model_version`` whose last
    heartbeat says it will refuse, or will fill fewer than ``folds`` folds (which widens the threshold), or
    that does not say how many images it keeps features of. The nodes are ``nodes``, else every active node
    (as ``RoundOpener`` picks them; an id that is not active is the opener's to refuse)."""
    from sqlalchemy import select

    from edge_node.protocol.envelope_moments import MIN_FOLD_IMAGES
    from edge_node.protocol.wire import NodeState
    from hub.service.heartbeat import envelope_counts
    from hub.store.schema import Node

    query = select(Node).where(Node.state == NodeState.ACTIVE.value)
    if nodes:
        query = query.where(Node.id.in_(sorted(set(nodes))))
    warnings = []
    with hub_database(settings) as db, db.session() as session:
        for node in session.scalars(query.order_by(Node.name, Node.id)):
            who = f"node {node.name} ({node.id})"
            if node.last_heartbeat is None:
                warnings.append(
                    f"{who} has sent no heartbeat yet: nothing is known of what it serves or keeps"
                )
                continue
            if (node.model_id, node.model_version) != (model_id, model_version):
                serves = (
                    "no model"
                    if node.model_id is None or node.model_version is None
                    else node.model_version
                    if node.model_id == model_id
                    else f"{node.model_id} {node.model_version}"
                )
                about = model_version if node.model_id == model_id else f"{model_id} {model_version}"
                warnings.append(f"{who} serves {serves}, the round is about {about}: it will refuse")
                continue
            envelope = envelope_counts(node.counts)
            if envelope is None or envelope.kept is None:
                why = "none analysed with it yet, or an older edge?" if envelope is None else "an older edge?"
                warnings.append(f"{who} has not said how many images it keeps features of ({why})")
            elif envelope.kept < MIN_FOLD_IMAGES:
                warnings.append(f"{who} keeps {envelope.kept}: it will refuse (fewer than {MIN_FOLD_IMAGES})")
            elif envelope.kept < folds * MIN_FOLD_IMAGES:
                warnings.append(
                    f"{who} keeps {envelope.kept}: it fills fewer than {folds} folds, which widens the "
                    "threshold (docs/envelope.md)"
                )
    return warnings


@dataclass(frozen=True)
class _Published:
    """A published envelope round, as the commands read it."""

    round_id: str
    config: dict[str, Any]
    artifact: str
    nodes: list[str]


def _published(session: Session, number: int, strategy: str) -> _Published:
    """Round ``number``; it must be a published ``strategy`` round."""
    from sqlalchemy import select

    from hub.store.schema import Round

    row = session.scalars(select(Round).where(Round.number == number)).first()
    if row is None:
        fail(f"there is no round {number}; see `fedclinic-hub rounds list`")
    if row.strategy != strategy:
        fail(f"round {number} is a {row.strategy} round, not {strategy}")
    if row.state != "published" or row.result_artifact is None:
        fail(f"round {number} is {row.state}; only a published round has an aggregate")
    return _Published(row.id, dict(row.config), row.result_artifact, list(row.nodes))


@app.command("threshold")
def threshold(
    round_number: Annotated[int, typer.Option("--round", help="The published envelope_moments round.")],
    data_dir: DataDirOption = None,
    nodes: NodesOption = None,
    min_results: MinResultsOption = 1,
    deadline: DeadlineOption = 3600.0,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Open round two: each node gets the envelopes fitted without each fold and sends the histogram of its
    images' held-out distances (no single distance leaves it)."""
    settings = settings_for(data_dir)
    with hub_database(settings) as db, db.session() as session:
        first = _published(session, round_number, "envelope_moments")
    request = RoundStart(
        strategy="envelope_distances",
        config=first.config,
        nodes=nodes or first.nodes,
        min_results=min_results,
        deadline_s=deadline,
        model_artifact=first.artifact,
    )
    info = _open(request, settings)
    emit(fmt, info, lambda console: console.print(_round_table(info)))


@dataclass(frozen=True)
class _Answers:
    """Both rounds' config, the sums' aggregate and each node's answers (node id → tensors)."""

    config: dict[str, Any]
    moments: dict[str, np.ndarray]
    moments_by_node: dict[str, dict[str, np.ndarray]]
    histograms_by_node: dict[str, dict[str, np.ndarray]]
    names: dict[str, str]


def _answers(settings: HubSettings, moments_round: int, distances_round: int) -> _Answers:
    """What ``build`` reads; the second round must have been opened from the first's config. The envelope
    rounds take no compression, so each answer is its stored payload."""
    from sqlalchemy import select

    from edge_node.protocol.tensors import decode_tensors
    from hub.store.artifacts import load_tensors
    from hub.store.schema import Node, Update

    with hub_database(settings) as db, db.session() as session:
        first = _published(session, moments_round, "envelope_moments")
        second = _published(session, distances_round, "envelope_distances")
        if second.config != first.config:
            fail(f"round {distances_round} was not opened from round {moments_round}'s bundle and folds")

        def by_node(round_id: str) -> dict[str, dict[str, np.ndarray]]:
            updates = session.scalars(select(Update).where(Update.round_id == round_id))
            return {u.node_id: decode_tensors(u.payload) for u in updates}

        moments_by_node, histograms_by_node = by_node(first.round_id), by_node(second.round_id)
        ids = set(moments_by_node) | set(histograms_by_node)
        names = {n.id: n.name for n in session.scalars(select(Node).where(Node.id.in_(sorted(ids))))}
        return _Answers(
            first.config, load_tensors(session, first.artifact), moments_by_node, histograms_by_node, names
        )


@app.command("build")
def build(
    moments_round: Annotated[int, typer.Option("--moments-round", help="The envelope_moments round.")],
    distances_round: Annotated[int, typer.Option("--distances-round", help="The envelope_distances round.")],
    bundle: Annotated[Path, typer.Option("--bundle", help="The bundle the rounds were about.")],
    out: Annotated[Path, typer.Option("--out", help="Directory of the new bundle (must not exist).")],
    model_version: Annotated[str, typer.Option("--model-version", help="Its version, above the bundle's.")],
    data_dir: DataDirOption = None,
    quantile: Annotated[
        float | None,
        typer.Option("--quantile", min=0.5, max=0.9999, help="Threshold quantile (default: the bundle's)."),
    ] = None,
    publish: Annotated[bool, typer.Option("--publish", help="Publish the new bundle to --cohort.")] = False,
    cohort: Annotated[str, typer.Option("--cohort", help="The cohort that gets it.")] = "default",
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Sign BUNDLE's model files with the envelope of both rounds as --model-version (and publish it)."""
    from edge_node.protocol.envelope_rounds import EnvelopeRounds, fitted_envelope
    from export.envelope import DEFAULT_QUANTILE
    from export.errors import ExportError
    from export.rebundle import rebundle_with_envelope
    from hub.rounds.envelope_influence import audit_answers
    from hub.service.datadir import load_signing_key, public_key
    from hub.service.publishing import publish_bundle

    settings = settings_for(data_dir)
    answers = _answers(settings, moments_round, distances_round)
    rounds = EnvelopeRounds.from_config(answers.config)
    manifest = _verified(bundle, settings).manifest
    if (manifest.model_id, manifest.model_version) != (rounds.model_id, rounds.model_version):
        fail(
            f"the rounds are about {rounds.model_id} {rounds.model_version}, {bundle} is "
            f"{manifest.model_id} {manifest.model_version}"
        )
    q = (
        quantile
        if quantile is not None
        else manifest.envelope.quantile
        if manifest.envelope
        else DEFAULT_QUANTILE
    )
    audit = audit_answers(answers.moments_by_node, answers.histograms_by_node, rounds, q)
    if not audit.influence:
        fail(f"no node answered both round {moments_round} and round {distances_round}", EXIT_FAILED)
    try:
        envelope = fitted_envelope(answers.moments, audit.histograms, rounds, q)
    except ValueError as exc:
        readable = [
            answers.names.get(n.node_id, n.node_id)
            for n in audit.influence
            if all(t is not None for t in n.threshold_without.values())
        ]
        hint = f" (without the counts of {', '.join(readable)} it can be read)" if readable else ""
        fail(f"no envelope from rounds {moments_round} and {distances_round}: {exc}{hint}", EXIT_FAILED)
    warnings = _audit_warnings(audit, envelope, answers.names)
    console = Console(stderr=True)
    for warning in warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    try:
        written = rebundle_with_envelope(
            bundle,
            out,
            envelope=envelope,
            model_version=model_version,
            private_key=load_signing_key(settings),
            trusted_keys=[public_key(settings)],
            federation=manifest.provenance.federation or settings.public_url or None,
            round_number=distances_round,
        )
    except ExportError as exc:
        fail(str(exc), EXIT_FAILED)
    publication = None
    if publish:
        with hub_database(settings) as db:
            signed = publish_bundle(
                db,
                load_signing_key(settings),
                settings.artifacts_dir,
                out,
                cohort=cohort,
                ttl_days=settings.publication_ttl_days,
                actor="cli",
            )
        publication = signed.record.publication_id
    result = _report(manifest.envelope, envelope, answers, audit, out, written.model_version, publication)
    result["warnings"] = warnings
    emit(fmt, result, lambda console: _render(console, result))


def _audit_warnings(audit: AnswerAudit, envelope: InputEnvelope, names: dict[str, str]) -> list[str]:
    """What the operator should look at before the nodes take the envelope."""
    from hub.rounds.envelope_influence import INFLUENCE_WARNING, thresholds_of

    def who(node: str) -> str:
        return f"node {names.get(node, node)} ({node})"

    out = [
        f"{who(node)} counted distances but sent no sums (it refused the first round): its counts are left "
        "out of the threshold"
        for node in audit.without_sums
    ]
    out += [
        f"{who(n.node_id)} counted {n.counted} distances for the {n.images} images it summed: it analysed "
        "images between the rounds, or its counts are not its images'"
        for n in audit.influence
        if n.counted != n.images
    ]
    for node, part, factor in audit.widening():
        moved = "widen" if factor > 1 else "narrow"
        out.append(
            f"{who(node)}: its sums alone {moved} the {part} fit {max(factor, 1 / factor):.2f}× (warned from "
            f"{INFLUENCE_WARNING}×): a clinic unlike the others, or sums made up; rerun both rounds without "
            f"it (`envelope start --exclude-node {node}`) to compare"
        )
    for node, part, factor in audit.strong(thresholds_of(envelope)):
        moved = "raise" if factor > 1 else "lower"
        size = "beyond reading without them" if factor == float("inf") else f"{max(factor, 1 / factor):.2f}×"
        out.append(
            f"{who(node)}: its counts alone {moved} the {part} threshold {size} (warned from "
            f"{INFLUENCE_WARNING}×): a clinic unlike the others, or counts made up; rerun both rounds "
            f"without it (`envelope start --exclude-node {node}`) to compare"
        )
    if audit.named(thresholds_of(envelope)) and len(audit.influence) < FEW_NODES:
        out.append(
            f"with {len(audit.influence)} nodes each is a large part of the envelope, and an honest clinic "
            'unlike the others is named too (docs/envelope.md, "One node\'s answers, read one by one")'
        )
    return out


def _report(
    before: Any,
    after: InputEnvelope,
    answers: _Answers,
    audit: AnswerAudit,
    out: Path,
    version: str,
    publication: str | None,
) -> dict[str, Any]:
    assert after.intensity is not None  # a federated envelope always has its grey-value part
    parts = {}
    pairs: tuple[tuple[str, InputEnvelope | IntensityEnvelope, Any], ...] = (
        ("embedding", after, before),
        ("intensity", after.intensity, before.intensity if before is not None else None),
    )
    for name, new, old in pairs:
        parts[name] = {
            "fitted_on": new.fitted_on,
            "threshold": new.threshold,
            "shrinkage": new.shrinkage,
            "source_fitted_on": old.fitted_on if old is not None else None,
            "source_threshold": old.threshold if old is not None else None,
        }
    return {
        "bundle": str(out),
        "model_version": version,
        "quantile": after.quantile,
        "nodes_moments": len(answers.moments_by_node),
        "nodes_distances": len(audit.influence),
        "parts": parts,
        "nodes": [
            {
                "node_id": n.node_id,
                "name": answers.names.get(n.node_id),
                "images": n.images,
                "counted": n.counted,
                "threshold_without": n.threshold_without,
                "widens": n.widens,
            }
            for n in audit.influence
        ],
        "counts_left_out": audit.without_sums,
        "publication_id": publication,
    }


def _render(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"envelope of {result['bundle']} ({result['model_version']})")
    for col in ("part", "images", "threshold", "shrinkage", "the source's images", "the source's threshold"):
        table.add_column(col)
    for name, p in result["parts"].items():
        table.add_row(
            name,
            str(p["fitted_on"]),
            f"{p['threshold']:.4g}",
            f"{p['shrinkage']:.3f}",
            "" if p["source_fitted_on"] is None else str(p["source_fitted_on"]),
            "" if p["source_threshold"] is None else f"{p['source_threshold']:.4g}",
        )
    console.print(table)
    nodes = Table(title="each node's part: the thresholds without its counts, the fit's spread with its sums")
    columns = (
        "node",
        "images",
        "counted",
        "embedding threshold",
        "grey threshold",
        "embedding spread",
        "grey spread",
    )
    for col in columns:
        nodes.add_column(col)
    parts = ("embedding", "intensity")
    for n in result["nodes"]:
        without, widens = n["threshold_without"], n["widens"]
        nodes.add_row(
            n["name"] or n["node_id"],
            str(n["images"]),
            str(n["counted"]),
            *("–" if without[part] is None else f"{without[part]:.4g}" for part in parts),
            *("–" if widens[part] is None else f"{widens[part]:.2f}×" for part in parts),
        )
    console.print(nodes)
    console.print(
        f"sums from {result['nodes_moments']} node(s), distances from {result['nodes_distances']}; "
        f"quantile {result['quantile']}"
        + (f"; published as {result['publication_id']}" if result["publication_id"] else ""),
        markup=False,
    )
