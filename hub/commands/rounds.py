"""`fedclinic-hub rounds start|status|updates|list|cancel|states`: federated rounds over the nodes."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edge_node.protocol.errors import EncodingError
from edge_node.protocol.protection import CompressionKind
from edge_node.protocol.tensors import decode_tensors
from edge_node.protocol.wire import RoundInfo, RoundProtection, RoundStart, RoundState, RoundUpdatesInfo
from hub.commands.output import EXIT_USAGE, FormatOption, OutputFormat, emit, emit_list, fail
from hub.commands.service_options import (
    DataDirOption,
    ExcludeNodesOption,
    hub_database,
    settings_for,
    taking_part,
)

app = typer.Typer(
    help="Start, watch, read node by node, list and cancel federated rounds.", no_args_is_help=True
)


def _parse_config(pairs: list[str]) -> dict[str, float | int | str | bool]:
    """KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, true/false), else as text."""
    out: dict[str, float | int | str | bool] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            fail(f"--config takes KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if not isinstance(value, (bool, int, float, str)):
            fail(f"--config {key}: only numbers, true/false and text are allowed")
        out[key] = value
    return out


def _public_tensors(path: Path) -> dict[str, np.ndarray]:
    """``--public``: x and soft_labels from the npz, named as the round's plan expects them."""
    from hub.rounds.plan import PUBLIC_PREFIX

    try:
        arrays = decode_tensors(path.read_bytes())
    except (OSError, EncodingError) as exc:
        fail(f"cannot read {path} as npz tensors: {exc}")
    if "x" not in arrays or not {"soft_labels", "y"} & set(arrays):
        fail(f"{path} needs x (N, C, H, W) with soft_labels (N, K) for fedhelp or y (N,) for hsl")
    return {PUBLIC_PREFIX + k: v for k, v in arrays.items() if k in ("x", "soft_labels", "y")}


def _table(rounds: Sequence[RoundInfo]) -> Table:
    table = Table(title="rounds")
    for col in ("#", "id", "strategy", "state", "answered", "k", "deadline", "reason"):
        table.add_column(col)
    for r in rounds:
        table.add_row(
            str(r.round),
            r.round_id,
            r.strategy,
            r.state.value,
            f"{r.accepted}/{len(r.nodes)}",
            str(r.min_results),
            f"{r.deadline:%H:%M:%S}",
            r.reason or "",
        )
    return table


def _protection(
    clip: float | None,
    epsilon: float | None,
    delta: float,
    compression: CompressionKind,
    topk_fraction: float,
    secagg: bool,
) -> RoundProtection | None:
    """The round's protection from the options; None when none was asked (a plain round)."""
    if clip is None and epsilon is None and compression is CompressionKind.NONE and not secagg:
        return None
    return RoundProtection(
        clip_norm=clip,
        epsilon=epsilon,
        delta=delta,
        compression=compression,
        topk_fraction=topk_fraction,
        secure_aggregation=secagg,
    )


@app.command("start")
def start(
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy", help="hub.fl strategy (fedavg, head_avg, …), stats, public_logits or kept_tensors."
        ),
    ],
    data_dir: DataDirOption = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", help="npz of starting tensors (public_logits: 'inputs'; kept_tensors: the student's)."
        ),
    ] = None,
    config: Annotated[
        list[str] | None, typer.Option("--config", help="Strategy setting KEY=VALUE (repeat).")
    ] = None,
    nodes: Annotated[
        list[str] | None, typer.Option("--node", help="Node id taking part (repeat); default all.")
    ] = None,
    exclude: ExcludeNodesOption = None,
    min_results: Annotated[
        int, typer.Option("--min-results", "-k", min=1, help="Results needed (k of n).")
    ] = 1,
    deadline: Annotated[float, typer.Option("--deadline", help="Seconds the round collects.")] = 3600.0,
    clip: Annotated[
        float | None, typer.Option("--clip", min=0, help="L2 clip norm of each node's update.")
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option("--epsilon", min=0, help="Per-round epsilon of each node (needs --clip).")
    ] = None,
    delta: Annotated[float, typer.Option("--delta", help="Delta of --epsilon.")] = 1e-5,
    compression: Annotated[
        CompressionKind,
        typer.Option("--compression", help="Compression of plain updates (nodes keep error feedback)."),
    ] = CompressionKind.NONE,
    topk_fraction: Annotated[
        float,
        typer.Option("--topk-fraction", min=0, max=1, help="topk: fraction of each tensor's entries sent."),
    ] = 0.01,
    secagg: Annotated[bool, typer.Option("--secagg", help="Ask for secure aggregation.")] = False,
    large: Annotated[
        list[str] | None,
        typer.Option("--large", help="fedhelp: node id in the large-client role (repeat); others small."),
    ] = None,
    public: Annotated[
        Path | None,
        typer.Option(
            "--public",
            help="fedhelp/hsl: npz of the public set (x, as preprocessed for inference) with its "
            "foundation soft_labels (fedhelp) or labels y (hsl), shipped once with this round's tasks.",
        ),
    ] = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Open a round: each node gets a task; it closes when all answered, or at the deadline with ≥ k.

    FedHelp: each `--large` node trains a private large model and the small proxy by dual distillation
    (it needs the torch learner); the others are small clients. Each task's config carries its role.

    To leave out a node that `rounds updates` named, start the next round with --exclude-node.

    Nodes check the stated protection (clip, epsilon, compression, secure aggregation, and the round's
    size) against their own privacy floor and refuse a round below it; refusals show in `rounds status`.
    """
    from hub.rounds.controller import RoundController
    from hub.rounds.plan import LARGE_CLIENTS
    from hub.store.artifacts import store_tensors

    settings = settings_for(data_dir)
    with hub_database(settings) as db:
        nodes = taking_part(db, nodes, exclude)
        # A value the round cannot take (pydantic validation, the strategy's checks) stops it, said why.
        try:
            artifact = None
            if model is not None:
                try:
                    tensors = decode_tensors(model.read_bytes())
                except (OSError, EncodingError) as exc:
                    fail(f"cannot read {model} as npz tensors: {exc}")
                if public is not None:
                    tensors.update(_public_tensors(public))
                with db.session() as session:
                    artifact = store_tensors(session, tensors, note=f"from {model.name}")
            elif public is not None:
                fail("--public ships with the round's starting model: pass --model as well")
            settings_map = _parse_config(config or [])
            if large:
                if strategy != "fedhelp":
                    fail("--large names FedHelp's large clients; use it with --strategy fedhelp")
                settings_map[LARGE_CLIENTS] = ",".join(sorted(set(large)))
            request = RoundStart(
                strategy=strategy,
                config=settings_map,
                nodes=nodes or [],
                min_results=min_results,
                deadline_s=deadline,
                model_artifact=artifact,
                protection=_protection(clip, epsilon, delta, compression, topk_fraction, secagg),
            )
            info = RoundController(db, settings).start(request, actor="cli")
        except ValueError as exc:
            fail(str(exc))
    emit(fmt, info, lambda console: console.print(_table([info])))


@app.command("status")
def status(
    round_ref: Annotated[str, typer.Argument(help="Round id or number.")],
    data_dir: DataDirOption = None,
    watch: Annotated[bool, typer.Option("--watch", help="Show progress until the round ends.")] = False,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """One round's state and progress (answered of n, k, deadline)."""
    from hub.rounds.controller import RoundController
    from hub.rounds.lifecycle import TERMINAL

    settings = settings_for(data_dir)
    with hub_database(settings) as db:
        controller = RoundController(db, settings)
        info = controller.info(round_ref)
        if watch and info.state not in TERMINAL:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns) as progress:
                bar = progress.add_task(f"round {info.round}", total=len(info.nodes))
                while info.state not in TERMINAL:
                    progress.update(
                        bar, completed=info.accepted, description=f"round {info.round} {info.state.value}"
                    )
                    time.sleep(1.0)
                    info = controller.info(round_ref)
                progress.update(bar, completed=info.accepted)

    def render(console: Console) -> None:
        console.print(_table([info]))
        for refusal in info.refusals:
            console.print(f"node {refusal.node_id} refused: {refusal.reason}", markup=False)

    emit(fmt, info, render)
    if info.state is RoundState.FAILED:
        # Scripts that wait on a round tell "it ended failed" from "the command failed" (1) by this code.
        raise typer.Exit(EXIT_USAGE)


@app.command("updates")
def updates(
    round_ref: Annotated[str, typer.Argument(help="Round id or number.")],
    data_dir: DataDirOption = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Each node's update of a training round, read against the others' (while it collects, or after).

    Per node: the images it says it trained on and their share, its update's norm over the round's median
    and whether the norm filter (robust=norm_filter) keeps it, how long the update is for the images it
    claims, the median cosine with the other nodes' updates, and the cosine between the round's mean with
    and without it. A node that alone turns the mean round, whose update is 3x too long or a quarter as
    long or shorter for its size, or the one that agrees least when several pull the mean far, is named
    on stderr with the command that leaves it out of the next round. Not for rounds under secure
    aggregation (the hub holds only their sum) nor collection rounds.
    """
    from hub.rounds.controller import RoundController

    settings = settings_for(data_dir)
    with hub_database(settings) as db:
        report = RoundController(db, settings).updates(round_ref)
    console = Console(stderr=True)
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    emit(fmt, report, lambda console: console.print(_updates_table(report)))


def _updates_table(report: RoundUpdatesInfo) -> Table:
    title = f"round {report.round} ({report.strategy}, {report.state.value}): each node's update"
    table = Table(title=title)
    columns = (
        "node",
        "id",
        "images",
        "share",
        "norm × median",
        "norm filter",
        "× for its size",
        "agreement",
        "keeps",
        "",
    )
    for col in columns:
        table.add_column(col)

    def number(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for n in report.nodes:
        table.add_row(
            n.name or "",
            n.node_id,
            f"{n.examples:g}",
            f"{n.share:.0%}",
            number(n.norm_ratio, ".2f"),
            "keeps" if n.within_filter else "drops",
            number(n.norm_for_size, ".2f"),
            number(n.agreement, "+.2f"),
            number(n.keeps, "+.2f"),
            "named" if n.named else "",
        )
    return table


@app.command("list")
def list_rounds(data_dir: DataDirOption = None, fmt: FormatOption = OutputFormat.table) -> None:
    """Recent rounds, newest first."""
    from hub.rounds.controller import RoundController

    settings = settings_for(data_dir)
    with hub_database(settings) as db:
        rounds = RoundController(db, settings).recent()
    emit_list(fmt, "rounds", rounds, _table)


@app.command("cancel")
def cancel(
    round_ref: Annotated[str, typer.Argument(help="Round id or number.")],
    data_dir: DataDirOption = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Stop an open or collecting round (it becomes failed, with the reason)."""
    from hub.rounds.controller import RoundController

    settings = settings_for(data_dir)
    with hub_database(settings) as db:
        info = RoundController(db, settings).cancel(round_ref, actor="cli")
    emit(fmt, info, lambda console: console.print(_table([info])))


@app.command("states")
def states() -> None:
    """Print the round life cycle's transition table."""
    from hub.rounds.lifecycle import transition_table

    table = Table(title="round life cycle")
    for col in ("from", "to", "when"):
        table.add_column(col)
    for row in transition_table():
        table.add_row(*row)
    Console().print(table)
