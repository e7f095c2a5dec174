"""`fedclinic-hub models publish|list|rollback|status`: signed publications of model bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from edge_node.protocol.publication import SignedPublication
from hub.commands.service_options import (
    DataDirOption,
    Format,
    FormatOption,
    database,
    fail,
    print_json,
    settings_for,
)
from hub.service.datadir import load_signing_key
from hub.service.enrollment import node_info
from hub.service.errors import HubServiceError
from hub.service.publishing import current_publication, list_publications, publish_bundle, rollback
from hub.store.schema import Node

app = typer.Typer(help="Publish model bundles to cohorts, canary them, roll them back.", no_args_is_help=True)


def _table(pubs: list[SignedPublication]) -> Table:
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
    fmt: FormatOption = Format.TABLE,
) -> None:
    """Verify the bundle with the hub's key and publish a signed record; nodes pull it on their next sync."""
    settings = settings_for(data_dir)
    db = database(settings)
    try:
        signed = publish_bundle(
            db,
            load_signing_key(settings),
            settings.artifacts_dir,
            bundle,
            cohort=cohort,
            canary_percent=canary,
            ttl_days=settings.publication_ttl_days,
            actor="cli",
        )
    except HubServiceError as exc:
        fail(str(exc))
    finally:
        db.close()
    if fmt is Format.JSON:
        print_json(signed)
    else:
        Console().print(_table([signed]))


@app.command("list")
def list_models(data_dir: DataDirOption = None, fmt: FormatOption = Format.TABLE) -> None:
    """Every publication, oldest first."""
    db = database(settings_for(data_dir))
    try:
        with db.session() as session:
            pubs = list_publications(session)
    finally:
        db.close()
    if fmt is Format.JSON:
        print_json({"publications": [p.model_dump(mode="json") for p in pubs]})
    else:
        Console().print(_table(pubs))


@app.command("rollback")
def rollback_cmd(
    data_dir: DataDirOption = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Publication id to go back to (default: the previous).")
    ] = None,
    cohort: Annotated[str, typer.Option("--cohort", help="Cohort to roll back.")] = "default",
    fmt: FormatOption = Format.TABLE,
) -> None:
    """Publish an earlier bundle again, signed as a rollback so that nodes accept the lower version."""
    settings = settings_for(data_dir)
    db = database(settings)
    try:
        signed = rollback(
            db,
            load_signing_key(settings),
            to_publication_id=to,
            cohort=cohort,
            ttl_days=settings.publication_ttl_days,
            actor="cli",
        )
    except HubServiceError as exc:
        fail(str(exc))
    finally:
        db.close()
    if fmt is Format.JSON:
        print_json(signed)
    else:
        Console().print(_table([signed]))


@app.command("status")
def status(data_dir: DataDirOption = None, fmt: FormatOption = Format.TABLE) -> None:
    """For each node: the publication it should serve and the model it reported serving."""
    db = database(settings_for(data_dir))
    rows = []
    try:
        with db.session() as session:
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
    finally:
        db.close()
    if fmt is Format.JSON:
        print_json({"nodes": rows})
        return
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
    Console().print(table)
