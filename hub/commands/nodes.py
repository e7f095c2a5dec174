"""`fedclinic-hub nodes enroll|list|revoke`: sites joining and leaving the federation."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edge_node.protocol.wire import JoinCodeIssued, NodeInfo
from hub.commands.output import FormatOption, OutputFormat, emit, emit_list, fail
from hub.commands.service_options import DataDirOption, hub_database, settings_for
from hub.service.tls import certificate_sha256

app = typer.Typer(help="Enroll, list and revoke clinic nodes.", no_args_is_help=True)


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = (datetime.now(timezone.utc) - moment).total_seconds()
    return f"{seconds:.0f} s ago" if seconds < 120 else moment.strftime("%Y-%m-%d %H:%M UTC")


@app.command("enroll")
def enroll(
    name: Annotated[str, typer.Argument(help="The site's name (letters, digits, . _ -).")],
    data_dir: DataDirOption = None,
    cohort: Annotated[str, typer.Option("--cohort", help="Model cohort the node belongs to.")] = "default",
    ttl: Annotated[int, typer.Option("--ttl", help="Seconds the join code stays valid.", min=60)] = 3600,
    hub_url: Annotated[str | None, typer.Option("--hub-url", help="Address the node should use.")] = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Print a single-use join code for a new site: `fedclinic-edge enroll CODE` on the node uses it."""
    from hub.service.enrollment import issue_join_code, node_info

    settings = settings_for(data_dir)
    url = hub_url or settings.public_url
    if not url:
        fail("no hub address known: pass --hub-url https://HOST:PORT or set public_url in hub.toml")
    with hub_database(settings) as db, db.session() as session:
        code, node, expires = issue_join_code(
            session,
            name=name,
            cohort=cohort,
            ttl_s=ttl,
            hub_url=url,
            tls_sha256=certificate_sha256(settings.tls_cert_path),
            actor="cli",
        )
        issued = JoinCodeIssued(join_code=code, node=node_info(node), expires_at=expires)

    def render(console: Console) -> None:
        console.print(
            f"join code for [bold]{name}[/bold] (node {issued.node.node_id}, "
            f"expires {expires:%Y-%m-%d %H:%M} UTC):"
        )
        console.print(code, soft_wrap=True)
        console.print(f"on the node: [bold]fedclinic-edge enroll {code[:12]}… --config edge.toml[/bold]")

    emit(fmt, issued, render)


def _nodes_table(nodes: Sequence[NodeInfo]) -> Table:
    table = Table(title="nodes")
    for col in (
        "id",
        "name",
        "cohort",
        "state",
        "last heartbeat",
        "credential since",
        "edge",
        "model",
        "health",
        "input envelope",
    ):
        # Identifiers never wrap: an operator copies them into the next command.
        table.add_column(col, no_wrap=col in ("id", "name"))
    for n in nodes:
        model = f"{n.model_id} {n.model_version}" if n.model_id else "-"
        table.add_row(
            n.node_id,
            n.node_name,
            n.cohort,
            n.state.value,
            _ago(n.last_heartbeat),
            _ago(n.credential_since) if n.credential_since else "-",
            n.edge_version or "-",
            model,
            n.health or "-",
            _envelope_cell(n),
        )
    return table


def _envelope_cell(n: NodeInfo) -> str:
    """The node's latest images outside its model's input envelope and how many images it keeps features of;
    the drift alarm (and images that look negative) in red."""
    from hub.service.heartbeat import EnvelopeCounts  # the store's models load only when a table is drawn

    if n.envelope_images is None or n.envelope_outside is None:
        return "-"
    counts = EnvelopeCounts(
        n.envelope_images, n.envelope_outside, bool(n.envelope_drifting), n.envelope_negative, n.envelope_kept
    )
    return f"[red]{counts.describe()}[/red]" if counts.drifting or counts.negative else counts.describe()


@app.command("list")
def list_nodes(data_dir: DataDirOption = None, fmt: FormatOption = OutputFormat.table) -> None:
    """Nodes with their state, last heartbeat, when their credential was set (enrolled, rotated), versions."""
    from hub.service.enrollment import listed_nodes

    with hub_database(settings_for(data_dir)) as db, db.session() as session:
        nodes = listed_nodes(session)
    emit_list(fmt, "nodes", nodes, _nodes_table)


@app.command("revoke")
def revoke(
    node: Annotated[str, typer.Argument(help="Node id or name.")],
    data_dir: DataDirOption = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Revoke a node: its next request is refused; no other site is touched."""
    from hub.service.enrollment import node_info, revoke_node

    with hub_database(settings_for(data_dir)) as db, db.session() as session:
        info = node_info(revoke_node(session, node, actor="cli"))
    emit(fmt, info, lambda console: console.print(f"revoked {info.node_id} ({info.node_name})"))
