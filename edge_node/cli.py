"""``fedclinic-edge``: run the node, show its state, install or roll back models, test a PACS connection."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from edge_node import __version__
from edge_node.errors import ConfigError, EdgeError
from edge_node.settings import EdgeSettings, load_settings

if TYPE_CHECKING:
    from edge_node.models import ModelSlot

__all__ = ["app"]

app = typer.Typer(
    name="fedclinic-edge",
    help="fedclinic edge node: takes studies from the PACS over DICOM, runs the model, sends results back.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML settings file; FEDCLINIC_EDGE_* environment variables override it.",
        exists=False,
        dir_okay=False,
    ),
]


def _setup_logging(level: str, *, service: bool = False) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU and DIMSE message at INFO: far too much for a service log. highdicom logs
    # source UIDs at INFO, and library warnings quote data values (patient names): neither may reach the log.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    if service:
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").setLevel(logging.ERROR)


def _settings(config: Path | None) -> EdgeSettings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code)


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: DICOM listener, worker and sender, until SIGTERM or Ctrl-C."""
    settings = _settings(config)
    _setup_logging(settings.log_level, service=True)
    from edge_node.node import Node

    logging.getLogger(__name__).info("fedclinic-edge %s starting", __version__)
    try:
        Node(settings).serve_forever()
    except (EdgeError, OSError) as exc:
        raise _fail(exc) from None


@app.command()
def status(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(help="How many recent studies to list.")] = 20,
) -> None:
    """Show the model in use and the most recent studies (identifiers shown only as short hashes)."""
    settings = _settings(config)
    from edge_node.store import Store

    if not settings.db_path.is_file():
        raise _fail(
            ConfigError(f"no edge database at {settings.db_path}; has `fedclinic-edge serve` run here?")
        )
    store = Store(settings.db_path)
    try:
        model = store.active_model()
        counts = store.counts()
        studies = store.recent_studies(limit)
        last_error = store.last_send_error()
        if model is None:
            console.print("[yellow]model:[/yellow] none installed (fedclinic-edge install-bundle PATH)")
        else:
            console.print(
                f"[bold]model:[/bold] {model.model_id} {model.version}  (key {model.key_fingerprint}, "
                f"installed {time.strftime('%Y-%m-%d %H:%M', time.localtime(model.installed_at))})"
            )
        states = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        console.print(f"[bold]totals:[/bold] {states or 'nothing received yet'}")
        if last_error:
            console.print(f"[yellow]last send error:[/yellow] {last_error}")
        table = Table(title=f"recent studies (last {limit})")
        for column in (
            "study",
            "state",
            "instances",
            "finding",
            "score",
            "model",
            "results",
            "last instance",
        ):
            table.add_column(column)
        for s in studies:
            finding = s.top_label or (s.reason or "")
            table.add_row(
                store.uid_hash(s.study_uid),
                s.state,
                str(s.n_instances),
                finding[:60],
                "" if s.top_score is None else f"{s.top_score:.3f}",
                s.model or "",
                s.results,
                time.strftime("%m-%d %H:%M:%S", time.localtime(s.last_instance_at)),
            )
        console.print(table)
    finally:
        store.close()


def _model_slot(settings: EdgeSettings) -> ModelSlot:
    from edge_node.models import ModelSlot
    from edge_node.store import Store

    return ModelSlot(
        Store(settings.db_path),
        settings.models_dir,
        settings.trusted_keys,
        providers=settings.providers,
        threads=settings.intra_op_threads,
    )


@app.command("install-bundle")
def install_bundle(
    path: Annotated[
        Path, typer.Argument(help="Bundle directory or .zip (manifest.json, manifest.sig, model.onnx).")
    ],
    config: ConfigOption = None,
) -> None:
    """Verify a signed model bundle and make it the active model (the previous one is kept for rollback)."""
    settings = _settings(config)
    _setup_logging("WARNING")
    slot = _model_slot(settings)
    try:
        record = slot.install(path)
    except EdgeError as exc:
        raise _fail(exc) from None
    finally:
        slot.store.close()
    console.print(
        f"[green]installed[/green] {record.model_id} {record.version} "
        f"(signed by key {record.key_fingerprint}); "
        "a running node switches to it before its next study"
    )


@app.command()
def rollback(config: ConfigOption = None) -> None:
    """Go back to the model that was active before the current one."""
    settings = _settings(config)
    _setup_logging("WARNING")
    slot = _model_slot(settings)
    try:
        record = slot.rollback()
    except EdgeError as exc:
        raise _fail(exc) from None
    finally:
        slot.store.close()
    console.print(f"[green]active again:[/green] {record.model_id} {record.version}")


@app.command()
def echo(
    host: Annotated[str, typer.Argument(help="PACS host name or address.")],
    port: Annotated[int, typer.Argument(help="PACS DICOM port.")],
    ae: Annotated[str, typer.Argument(help="The PACS's AE title (called AE).")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title as the PACS knows it.")] = "FEDCLINIC",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the PACS.")] = 10.0,
) -> None:
    """Test a DICOM connection with C-ECHO (exit code 0 when the PACS answers success)."""
    _setup_logging("ERROR")
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from edge_node.dicom.nodelay import NODELAY_HANDLERS

    client = AE(ae_title=calling_ae)
    client.add_requested_context(Verification)
    client.acse_timeout = client.dimse_timeout = client.network_timeout = timeout
    client.connection_timeout = timeout
    t0 = time.perf_counter()
    assoc = client.associate(host, port, ae_title=ae, evt_handlers=list(NODELAY_HANDLERS))
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "not established (no answer or connection refused)"
        raise _fail(EdgeError(f"association with {ae}@{host}:{port} {why}"))
    try:
        result = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(result.Status) if result and "Status" in result else -1
    ms = (time.perf_counter() - t0) * 1000
    if code != 0:
        raise _fail(EdgeError(f"C-ECHO to {ae}@{host}:{port} answered status 0x{code:04X}"))
    console.print(f"[green]C-ECHO ok[/green]: {ae}@{host}:{port} answered success in {ms:.0f} ms")


@app.command()
def states() -> None:
    """Print the study life cycle (the state machine the worker follows)."""
    from edge_node.store import format_transitions

    console.print(format_transitions(), highlight=False)


if __name__ == "__main__":
    app()
