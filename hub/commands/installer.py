"""`fedclinic-hub installer build`: the offline kit a clinic installs its edge node from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hub.commands.output import EXIT_FAILED, FormatOption, OutputFormat, emit

app = typer.Typer(help="Build the clinic installer kit (offline, signed).", no_args_is_help=True)


@app.command("build")
def build(
    out: Annotated[Path, typer.Option("--out", help="New folder for the kit (copy it to the clinic as is).")],
    key: Annotated[
        Path, typer.Option("--key", help="The hub's private signing key (hub.key, mode 0600).")
    ] = Path("keys/hub.key"),
    gpu: Annotated[
        bool, typer.Option("--gpu", help="NVIDIA variant (onnxruntime-gpu) instead of CPU-only.")
    ] = False,
    platform: Annotated[
        list[str] | None,
        typer.Option(
            "--platform",
            help="Target wheel platform tag, repeatable, e.g. manylinux_2_28_x86_64 (default: this machine).",
        ),
    ] = None,
    python_version: Annotated[
        str | None,
        typer.Option("--python-version", help="The clinic's python3 version, e.g. 3.10 (default: this one)."),
    ] = None,
    join_code: Annotated[
        str | None, typer.Option("--join-code", help="Put this join code in the kit (one clinic per code).")
    ] = None,
    hub_fingerprint: Annotated[
        str | None, typer.Option("--hub-fingerprint", help="The hub's TLS certificate fingerprint.")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", help="A signed model bundle (dir or .zip) the node starts with."),
    ] = None,
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Build a kit: a wheelhouse of exactly the edge node's dependencies (CPU or NVIDIA), pinned, hashed and
    signed with the hub key.

    Give the clinic the kit folder and, on another channel (phone, letter), the key fingerprint this prints:
    the installer refuses a kit signed by any other key.

    Example: fedclinic-hub installer build --out kit-clinic-a --key keys/hub.key --join-code CODE
    """
    from export.errors import KeyFileError
    from export.signing import load_private_key
    from installers.errors import KitError
    from installers.kit_builder import BuildOptions, build_kit

    console = Console(stderr=output_format is OutputFormat.json)
    try:
        private = load_private_key(key)
    except KeyFileError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    options = BuildOptions(
        out=out,
        variant="gpu" if gpu else "cpu",
        python_version=python_version,
        platforms=tuple(platform or ()),
        join_code=join_code,
        hub_fingerprint=hub_fingerprint,
        bundle=bundle,
    )
    try:
        with console.status("building the kit") as status:
            built = build_kit(options, private, step=lambda msg: status.update(msg))
    except KitError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    summary: dict[str, str | int | float] = {
        "kit": str(built.path),
        "fedclinic_version": built.manifest.fedclinic_version,
        "variant": built.manifest.variant,
        "python": built.manifest.python,
        "platform": built.manifest.platform,
        "wheels": len(built.manifest.wheels()),
        "size_bytes": built.size_bytes,
        "key_fingerprint": built.key_fingerprint,
        "seconds": round(built.seconds, 1),
    }

    def render(out: Console) -> None:
        table = Table(title="kit built", show_header=False)
        for name, value in summary.items():
            table.add_row(name, f"{built.size_bytes / 1e6:.1f} MB" if name == "size_bytes" else str(value))
        out.print(table)
        out.print(
            f"Tell the clinic this key fingerprint on another channel: [bold]{built.key_fingerprint}[/bold]"
        )

    emit(output_format, summary, render)
