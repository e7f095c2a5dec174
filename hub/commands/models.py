"""`fedclinic-hub models publish|list|rollback|status`: signed publications of model bundles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from edge_node.protocol.publication import SignedPublication
from hub.commands.output import FormatOption, OutputFormat, emit, emit_list
from hub.commands.service_options import DataDirOption, hub_database, settings_for
from hub.service.settings import HubSettings

if TYPE_CHECKING:
    from hub.store.database import Database

app = typer.Typer(help="Publish model bundles to cohorts, canary them, roll them back.", no_args_is_help=True)


def _table(pubs: Sequence[SignedPublication]) -> Table:
    table = Table(title="publications")
    for col in ("seq", "id", "model", "version", "cohort", "nodes", "rollback", "expires"):
        table.add_column(col)
    for p in pubs:
        r = p.record
        nodes = ", ".join(r.nodes) if r.nodes else "all"
        table.add_row(
            str(r.seq),
            r.publication_id,
            r.model_id,
            r.model_version,
            r.cohort,
            nodes,
            "yes" if r.rollback else "",
            f"{r.expires_at:%Y-%m-%d}",
        )
    return table


def _sign(
    data_dir: Path | None,
    fmt: OutputFormat,
    action: Callable[[Database, HubSettings], SignedPublication],
) -> None:
    """Run one signing action (publish, rollback) on the hub's store and report the record it signed."""
    settings = settings_for(data_dir)
    with hub_database(settings) as db:
        signed = action(db, settings)
    emit(fmt, signed, lambda console: console.print(_table([signed])))


@app.command("publish")
def publish(
    bundle: Annotated[
        Path, typer.Argument(help="A signed bundle directory or zip (from `fedclinic-hub export`).")
    ],
    data_dir: DataDirOption = None,
    cohort: Annotated[str, typer.Option("--cohort", help="The cohort that gets it.")] = "default",
    canary: Annotated[
        float, typer.Option("--canary", help="Percent of the cohort's active nodes that get it first.")
    ] = 100.0,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Verify the bundle with the hub's key and publish a signed record; nodes pull it on their next sync."""
    from hub.service.datadir import load_signing_key
    from hub.service.publishing import publish_bundle

    _sign(
        data_dir,
        fmt,
        lambda db, settings: publish_bundle(
            db,
            load_signing_key(settings),
            settings.artifacts_dir,
            bundle,
            cohort=cohort,
            canary_percent=canary,
            ttl_days=settings.publication_ttl_days,
            actor="cli",
        ),
    )


@app.command("list")
def list_models(data_dir: DataDirOption = None, fmt: FormatOption = OutputFormat.table) -> None:
    """Every publication, oldest first."""
    from hub.service.publishing import list_publications

    with hub_database(settings_for(data_dir)) as db, db.session() as session:
        pubs = list_publications(session)
    emit_list(fmt, "publications", pubs, _table)


@app.command("rollback")
def rollback_cmd(
    data_dir: DataDirOption = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Publication id to go back to (default: the previous).")
    ] = None,
    cohort: Annotated[str, typer.Option("--cohort", help="Cohort to roll back.")] = "default",
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Publish an earlier bundle again, signed as a rollback so that nodes accept the lower version."""
    from hub.service.datadir import load_signing_key
    from hub.service.publishing import rollback

    _sign(
        data_dir,
        fmt,
        lambda db, settings: rollback(
            db,
            load_signing_key(settings),
            to_publication_id=to,
            cohort=cohort,
            ttl_days=settings.publication_ttl_days,
            actor="cli",
        ),
    )


@app.command("status")
def status(data_dir: DataDirOption = None, fmt: FormatOption = OutputFormat.table) -> None:
    """For each node: the publication it should serve and the model it reported serving."""
    from sqlalchemy import select

    from hub.service.enrollment import node_info
    from hub.service.publishing import current_publication
    from hub.store.schema import Node

    rows = []
    with hub_database(settings_for(data_dir)) as db, db.session() as session:
        for node in session.scalars(select(Node).order_by(Node.name)):
            target = current_publication(session, node)
            info = node_info(node)
            rows.append(
                {
                    "node_id": info.node_id,
                    "node_name": info.node_name,
                    "cohort": info.cohort,
                    "should_serve": target.record.publication_id if target else None,
                    "version": target.record.model_version if target else None,
                    "serves": info.publication_id,
                    "in_sync": target is not None and info.publication_id == target.record.publication_id,
                }
            )
    emit(fmt, {"nodes": rows}, lambda console: console.print(_status_table(rows)))


def _status_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="model status")
    for col in ("node", "cohort", "should serve", "version", "serves", "in sync"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["node_name"]),
            str(r["cohort"]),
            str(r["should_serve"] or "-"),
            str(r["version"] or "-"),
            str(r["serves"] or "-"),
            "yes" if r["in_sync"] else "no",
        )
    return table
