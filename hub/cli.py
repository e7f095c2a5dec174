"""`fedclinic-hub`: the hub operator's admin CLI, a registry of command modules (one line each).

Command modules import torch and the export pipeline only inside the commands that need them, so that
``--help``, ``--version``, ``keys`` and ``data list`` answer at once, even where torch is not installed.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from hub import __version__
from hub.commands import (
    data,
    envelope,
    export_bundle,
    init,
    installer,
    keys,
    models,
    nodes,
    rounds,
    serve,
    status,
    students,
    train,
)

app = typer.Typer(
    name="fedclinic-hub",
    help="Hub operator CLI: train teachers and students, export signed bundles, manage keys and data.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command("train")(train.train)
app.command("export")(export_bundle.export)
app.add_typer(keys.app, name="keys")
app.add_typer(data.app, name="data")
app.add_typer(installer.app, name="installer")
app.command("init")(init.init)
app.command("serve")(serve.serve)
app.add_typer(nodes.app, name="nodes")
app.add_typer(rounds.app, name="rounds")
app.add_typer(models.app, name="models")
app.add_typer(envelope.app, name="envelope")
app.command("status")(status.status)
app.command("distill")(students.distill)
models.app.command("from-round")(students.from_round)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fedclinic-hub {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


if __name__ == "__main__":
    app()
