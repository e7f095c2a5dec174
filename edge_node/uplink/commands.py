"""The uplink's part of ``fedclinic-edge``: the ``enroll`` command and the hub lines of ``status``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edge_node import __version__
from edge_node.errors import ConfigError, EdgeError
from edge_node.settings import EdgeSettings, load_settings

__all__ = ["credential_app", "enroll_command", "print_uplink_status", "updates_command", "uplink_status"]

console = Console()
err_console = Console(stderr=True)


def enroll_command(
    code: Annotated[str, typer.Argument(help="The join code from `fedclinic-hub nodes enroll NAME`.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML settings file; FEDCLINIC_EDGE_* variables override it."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing enrollment (the old one stops).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the hub.")] = 15.0,
) -> None:
    """Join the federation: check the hub's certificate against the code, create this node's credential.

    The code carries the hub's address, its certificate fingerprint and a one-time secret; it works once and
    expires. The node creates its own secret (the hub keeps only a hash of it) and stores it readable only by
    this user under data_dir/uplink. HTTPS_PROXY is honoured. A running node starts syncing when restarted.

    Example: fedclinic-edge enroll fcj1.eyJo... --config /etc/fedclinic/edge.toml
    """
    logging.basicConfig(level=logging.WARNING)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    from edge_node.uplink.credential import uplink_dir
    from edge_node.uplink.enrollment import enroll

    try:
        credential = enroll(
            code, uplink_dir(settings.data_dir), edge_version=__version__, force=force, timeout=timeout
        )
    except EdgeError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(
        f"[green]enrolled[/green] as {credential.node_name} (node {credential.node_id}, cohort "
        f"{credential.cohort}) with {credential.hub_url}; certificate {credential.tls_sha256[:16]}… pinned",
        highlight=False,
    )


def _ago(moment: float) -> str:
    seconds = max(0.0, time.time() - moment)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(moment))


def uplink_status(settings: EdgeSettings) -> dict[str, Any]:
    """The ``hub`` object of ``status --format json`` (keys are only ever added; never the secret).

    ``enrolled`` is false for a stand-alone node; ``credential_error`` says why a stored credential cannot be
    read; ``last_error`` is the hub's last refusal or why it could not be reached (a revoked credential shows
    here as the hub's 401 answer).
    """
    from edge_node.uplink.credential import NodeCredential, uplink_dir
    from edge_node.uplink.state import StateFile

    directory = uplink_dir(settings.data_dir)
    try:
        credential = NodeCredential.load(directory)
    except EdgeError as exc:
        return {"enrolled": False, "credential_error": str(exc)}
    if credential is None:
        return {"enrolled": False}
    state = StateFile.read(directory / "state.json")
    return {
        "enrolled": True,
        "hub_url": credential.hub_url,
        "node_id": credential.node_id,
        "node_name": credential.node_name,
        "cohort": credential.cohort,
        "last_ok_at": state.last_ok_at,
        "last_attempt_at": state.last_attempt_at,
        "last_error": state.last_error,
        "last_error_at": state.last_error_at,
        "publication_id": state.publication_id,
        "last_refusal": state.last_refusal,
        "tasks_answered": state.tasks_answered,
    }


def print_uplink_status(out: Console, settings: EdgeSettings) -> None:
    """The hub lines of ``status``: enrollment, last contact and, when it failed, why."""
    from edge_node.uplink.credential import NodeCredential, uplink_dir
    from edge_node.uplink.state import StateFile

    directory = uplink_dir(settings.data_dir)
    try:
        credential = NodeCredential.load(directory)
    except EdgeError as exc:
        out.print(f"[red]hub:[/red] {exc}", highlight=False)
        return
    if credential is None:
        out.print("[bold]hub:[/bold] not enrolled (stand-alone; fedclinic-edge enroll CODE to join)")
        return
    state = StateFile.read(directory / "state.json")
    line = f"[bold]hub:[/bold] {credential.hub_url} as {credential.node_name} ({credential.node_id})"
    if state.last_ok_at is None:
        line += ", [yellow]not reached yet[/yellow]"
    else:
        line += f", last reached {_ago(state.last_ok_at)}"
    out.print(line, highlight=False)
    if state.last_error is not None and state.last_error_at is not None:
        out.print(
            f"[yellow]hub unreachable since {_ago(state.last_error_at)}:[/yellow] {state.last_error}",
            highlight=False,
        )
    if state.publication_id is not None:
        out.print(f"[bold]publication:[/bold] {state.publication_id} (seq {state.last_seq})", highlight=False)
    if state.last_refusal is not None:
        out.print(f"[yellow]last refused publication:[/yellow] {state.last_refusal}", highlight=False)


def updates_command(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML settings file; FEDCLINIC_EDGE_* variables override it."),
    ] = None,
    output: Annotated[
        str, typer.Option("--format", help="text for people, json for scripts (stable keys).")
    ] = "text",
) -> None:
    """What left this clinic: each update sent to the hub (kind, bytes, when, round, privacy spent).

    Bytes are those of the encoded update as sent; privacy is what the clinic's ledger charged before the
    update could leave. Nothing else leaves the clinic: no images, no patient data.

    Example: fedclinic-edge updates --config /etc/fedclinic/edge.toml --format json
    """
    import json

    from edge_node.uplink.credential import NodeCredential, uplink_dir
    from edge_node.uplink.update_log import UpdateLog

    if output not in ("text", "json"):
        err_console.print("[red]error:[/red] --format is text or json")
        raise typer.Exit(2)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    try:
        credential = NodeCredential.load(uplink_dir(settings.data_dir))
    except EdgeError:
        credential = None
    hub_url = credential.hub_url if credential is not None else None
    log = UpdateLog.read(settings.data_dir, settings.privacy, hub_url)
    if output == "json":
        typer.echo(json.dumps({"hub_url": hub_url, **log.to_json()}, indent=1))
        return
    console.print(log.summary, highlight=False)
    if not log.updates:
        return
    table = Table(title=f"updates sent to {hub_url or 'the hub'}")
    for column in ("round", "kind", "bytes", "state", "queued", "sent", "privacy spent", "task"):
        table.add_column(column)
    for u in log.updates:
        table.add_row(
            str(u.round),
            u.kind,
            f"{u.payload_bytes:,}",
            u.state if u.last_error is None or u.state == "sent" else f"{u.state}: {u.last_error}",
            u.queued_at,
            u.sent_at or "",
            u.privacy_words(),
            u.task_id,
        )
    console.print(table)


credential_app = typer.Typer(help="This node's credential at the hub: rotate it.", no_args_is_help=True)


@credential_app.command("rotate")
def rotate_command(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML settings file; FEDCLINIC_EDGE_* variables override it."),
    ] = None,
    output: Annotated[
        str, typer.Option("--format", help="text for people, json for scripts (stable keys).")
    ] = "text",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the hub.")] = 15.0,
) -> None:
    """Give this node a new secret at the hub; the old one is refused from its next request on.

    The new secret is generated here and only its hash reaches the hub. A running node (serve) picks the new
    secret up by itself. If the hub's answer is lost, run the command again: it first finishes the rotation
    that was under way. No other node is touched. The secret is never printed.

    Example: fedclinic-edge credential rotate --config /etc/fedclinic/edge.toml --format json
    """
    import json

    from edge_node.uplink.credential import NodeCredential, uplink_dir
    from edge_node.uplink.rotation import rotate_credential

    logging.basicConfig(level=logging.WARNING)
    if output not in ("text", "json"):
        err_console.print("[red]error:[/red] --format is text or json")
        raise typer.Exit(2)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    directory = uplink_dir(settings.data_dir)
    try:
        rotation = rotate_credential(directory, timeout=timeout)
    except EdgeError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    credential = rotation.credential
    if output == "json":
        doc = {
            "node_id": credential.node_id,
            "node_name": credential.node_name,
            "hub_url": credential.hub_url,
            "rotated": True,
            "resumed": rotation.resumed,
            "credential_file": str(NodeCredential.path_in(directory)),
        }
        typer.echo(json.dumps(doc, indent=1))
        return
    how = "finished the interrupted rotation" if rotation.resumed else "rotated the credential"
    console.print(
        f"[green]{how}[/green] of {credential.node_name} (node {credential.node_id}) with "
        f"{credential.hub_url}; the previous secret is refused from now on",
        highlight=False,
    )
