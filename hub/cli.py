"""`fedclinic-hub`: the hub operator's admin CLI."""

from __future__ import annotations

import logging

import typer

from hub.commands import (
    bench,
    data,
    demo,
    export_bundle,
    init,
    keys,
    models,
    nodes,
    rounds,
    serve,
    status,
    train,
)

app = typer.Typer(
    name="fedclinic-hub",
    help="Hub operator CLI: train teachers and students, export signed bundles, manage keys, run benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command("train")(train.train)
app.command("export")(export_bundle.export)
app.command("demo")(demo.demo)
app.add_typer(keys.app, name="keys")
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
app.command("init")(init.init)
app.command("serve")(serve.serve)
app.add_typer(nodes.app, name="nodes")
app.add_typer(rounds.app, name="rounds")
app.add_typer(models.app, name="models")
app.command("status")(status.status)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


if __name__ == "__main__":
    app()
