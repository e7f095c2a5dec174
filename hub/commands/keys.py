"""`fedclinic-hub keys`: create the hub's Ed25519 signing key pair and show key fingerprints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edge_node.protocol.signing import fingerprint
from export.errors import KeyFileError
from export.signing import create_keypair, load_private_key, load_public_key_file
from hub.commands.output import EXIT_FAILED, FormatOption, OutputFormat, emit

app = typer.Typer(help="Manage the hub's bundle signing keys (Ed25519).", no_args_is_help=True)


@app.command("create")
def create(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for hub.key (private, mode 0600) and hub.pub.")
    ] = Path("keys"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key pair.")] = False,
) -> None:
    """Create a signing key pair: keep hub.key on the hub, copy hub.pub to every edge node."""
    console = Console()
    try:
        private, public = create_keypair(out, overwrite=force)
    except KeyFileError as exc:
        console.print(f"[red]error:[/red] {exc} (pass --force to replace it)")
        raise typer.Exit(EXIT_FAILED) from exc
    fp = fingerprint(load_public_key_file(public))
    console.print(
        f"created [bold]{private}[/bold] (private, 0600) and [bold]{public}[/bold]; fingerprint {fp}"
    )


@app.command("show")
def show(
    path: Annotated[Path, typer.Argument(help="A hub.pub or hub.key file.")],
    output: FormatOption = OutputFormat.table,
) -> None:
    """Print a key's fingerprint (first 16 hex digits of the sha256 of the raw public key).

    Example: fedclinic-hub keys show keys/hub.pub --format json
    """
    console = Console(stderr=output is OutputFormat.json)
    try:
        try:
            key = load_public_key_file(path)
            kind = "public"
        except KeyFileError:
            key = load_private_key(path).public_key()
            kind = "private"
    except KeyFileError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from exc

    def render(out: Console) -> None:
        table = Table(show_header=False)
        table.add_row("file", str(path))
        table.add_row("kind", f"Ed25519 {kind} key")
        table.add_row("fingerprint", fingerprint(key))
        out.print(table)

    emit(
        output,
        {"file": str(path), "kind": kind, "algorithm": "Ed25519", "fingerprint": fingerprint(key)},
        render,
    )
