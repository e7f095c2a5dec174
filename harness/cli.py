"""`fedclinic-lab`: the benchmark and the demo, run around the product as a lab would."""

from __future__ import annotations

import logging

import typer

from harness.demo import command as demo
from harness.flbench import command as bench

app = typer.Typer(
    name="fedclinic-lab",
    help="Lab commands around the product: the federated benchmark and the whole-product demo.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command("demo")(demo.demo)
app.add_typer(bench.app, name="bench")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


if __name__ == "__main__":
    app()
