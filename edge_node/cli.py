"""``fedclinic-edge``: run and check the node, show its state, install or roll back models, test a PACS."""

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

APP_HELP = """fedclinic edge node: receives studies from the PACS over DICOM, runs the AI model on them and
sends the result (a DICOM structured report, optionally an annotated image) back to the PACS.

Settings come from a TOML file given with --config and from FEDCLINIC_EDGE_* environment variables
(a variable wins over the file). Patient data never leaves this machine.

First setup, step by step:

  fedclinic-edge config-check --config /etc/fedclinic/edge.toml

  fedclinic-edge install-bundle bundle.zip --config /etc/fedclinic/edge.toml

  fedclinic-edge serve --config /etc/fedclinic/edge.toml

Then, at any time: fedclinic-edge status --config /etc/fedclinic/edge.toml"""

app = typer.Typer(
    name="fedclinic-edge",
    help=APP_HELP,
    rich_markup_mode="markdown",
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
    """Run the node: DICOM listener, analysis and sending of results, until stopped (SIGTERM or Ctrl-C).

    Usually started by the system service, not by hand. Studies received while it was stopped, or while no
    model was installed, are analysed when it runs again; nothing is lost on a power cut.

    Example: fedclinic-edge serve --config /etc/fedclinic/edge.toml
    """
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
    """Show the model in use (file, precision, and the processor it really runs on) and the recent studies.

    Study identifiers are shown only as short hashes, never as patient data. "runs on CPUExecutionProvider"
    next to a GPU setting means the GPU libraries did not load: the node works, but slower.

    Example: fedclinic-edge status --config /etc/fedclinic/edge.toml --limit 50
    """
    settings = _settings(config)
    from edge_node.store import Store

    if not settings.db_path.is_file():
        raise _fail(
            ConfigError(f"no edge database at {settings.db_path}; has `fedclinic-edge serve` run here?")
        )
    store = Store(settings.db_path)
    try:
        model = store.models.active()
        counts = store.counts()
        studies = store.recent_studies(limit)
        last_error = store.outbox.last_error()
        if model is None:
            console.print("[yellow]model:[/yellow] none installed (fedclinic-edge install-bundle PATH)")
        else:
            console.print(
                f"[bold]model:[/bold] {model.model_id} {model.version}  (key {model.key_fingerprint}, "
                f"installed {time.strftime('%Y-%m-%d %H:%M', time.localtime(model.installed_at))})",
                highlight=False,
            )
            _print_serving(settings, model.model_id, model.version)
        from edge_node.uplink.commands import print_uplink_status

        print_uplink_status(console, settings)
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


def _print_serving(settings: EdgeSettings, model_id: str, version: str) -> None:
    """The line under the model: what the node really loaded, from the record it writes at each load."""
    from edge_node.serving import read_serving

    record = read_serving(settings.serving_path)
    if record is None:
        console.print("[yellow]serving:[/yellow] not loaded yet (the node loads the model when it starts)")
        return
    if (record.model_id, record.model_version) != (model_id, version):
        console.print(
            f"[yellow]serving:[/yellow] {record.model_id} {record.model_version} until its next study "
            "(the running node switches to the active model then)",
            highlight=False,
        )
        return
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.loaded_at))
    variant = f"{record.model_file} ({record.precision})"
    if record.precision != record.requested_precision:
        variant += f" [yellow]- the bundle has no {record.requested_precision} variant[/yellow]"
    where = f"runs on {record.provider}"
    if record.fell_back:
        where = (
            f"[yellow]runs on {record.provider}[/yellow] (asked for {record.requested_provider}, which did "
            "not load: check the CUDA / cuDNN / TensorRT libraries)"
        )
    console.print(f"[bold]serving:[/bold] {variant}, {where}, since {since}", highlight=False)


def _model_slot(settings: EdgeSettings) -> ModelSlot:
    from edge_node.models import ModelSlot
    from edge_node.store import Store

    return ModelSlot.from_settings(Store(settings.db_path), settings)


@app.command("install-bundle")
def install_bundle(
    path: Annotated[
        Path, typer.Argument(help="Bundle directory or .zip (manifest.json, manifest.sig, model.onnx).")
    ],
    config: ConfigOption = None,
) -> None:
    """Verify a signed model bundle and make it the active model; the previous one is kept for rollback.

    The bundle must be signed by a key in trusted_keys; a bundle that was changed or signed by another key
    is refused and the node keeps its current model. A running node switches before its next study.

    Example: fedclinic-edge install-bundle /media/usb/student-1.2.0.zip --config edge.toml
    """
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
    """Go back to the model that was active before the current one (a running node switches too).

    Example: fedclinic-edge rollback --config /etc/fedclinic/edge.toml
    """
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
    """Test a DICOM connection with C-ECHO (a "DICOM ping"); exit code 0 when the PACS answers success.

    Example: fedclinic-edge echo 10.0.0.5 104 PACS --calling-ae FEDCLINIC
    """
    _setup_logging("ERROR")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the failure is reported below, in words
    from edge_node.config_check import c_echo
    from edge_node.settings import DestinationSettings

    try:
        dest = DestinationSettings(ae_title=ae, host=host, port=port)
        DestinationSettings(ae_title=calling_ae, host=host, port=port)
    except ValueError as exc:
        raise _fail(EdgeError(f"invalid AE title or port: {exc}"), 2) from None
    result = c_echo(dest, calling_ae, timeout=timeout)
    if not result.ok:
        raise _fail(EdgeError(f"C-ECHO to {result.address} failed: {result.detail}"))
    console.print(
        f"[green]C-ECHO ok[/green]: {result.address} answered success in {result.milliseconds:.0f} ms",
        highlight=False,
    )


@app.command("config-check")
def config_check(
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each destination.")] = 10.0,
) -> None:
    """Check the setup before (or while) the node runs; exit code 0 when everything needed works.

    Checks that the settings load, the hub's public key file exists and reads, the data directory is
    writable, every destination (PACS) answers a C-ECHO, and which ONNX Runtime execution providers exist
    compared with the one a session for the active model really gets.

    Example: fedclinic-edge config-check --config /etc/fedclinic/edge.toml
    """
    settings = _settings(config)
    _setup_logging("ERROR")
    # A destination that does not answer is reported in the table; pynetdicom's own error lines are noise.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    from edge_node.config_check import (
        check_data_dir,
        check_destinations,
        check_runtime,
        check_trusted_keys,
    )

    checks = [check_trusted_keys(settings), check_data_dir(settings)]
    table = Table(title="node")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")  # paths and provider names are never cut off
    table.add_row("settings", "[green]ok[/green]", str(config) if config else "environment only")
    for check in checks:
        table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAILED[/red]", check.detail)
    runtime = check_runtime(settings)
    table.add_row("providers available", "", ", ".join(runtime.available))
    table.add_row(
        "providers configured",
        "",
        ", ".join(p if p in runtime.available else f"{p} (not in this build)" for p in runtime.configured),
    )
    if runtime.session_provider is None:
        table.add_row("session", "[yellow]not tested[/yellow]", runtime.problem or "")
    elif runtime.fell_back:
        table.add_row(
            "session",
            "[yellow]fell back[/yellow]",
            f"{runtime.model} runs on {runtime.session_provider}; asked for {runtime.requested_provider}, "
            "which did not load (check the CUDA / cuDNN / TensorRT libraries)",
        )
    elif runtime.session_provider != runtime.configured[0]:
        table.add_row(
            "session",
            "[yellow]not first choice[/yellow]",
            f"{runtime.model} runs on {runtime.session_provider}; {runtime.configured[0]} is not available "
            "in this onnxruntime build",
        )
    else:
        table.add_row("session", "[green]ok[/green]", f"{runtime.model} runs on {runtime.session_provider}")
    console.print(table)

    echoes = check_destinations(settings, timeout=timeout)
    dest_table = Table(title="destinations (C-ECHO)")
    for column in ("destination", "result", "time"):
        dest_table.add_column(column)
    dest_table.add_column("detail", overflow="fold")
    for echo_result in echoes:
        dest_table.add_row(
            echo_result.address,
            "[green]ok[/green]" if echo_result.ok else "[red]FAILED[/red]",
            f"{echo_result.milliseconds:.0f} ms",
            echo_result.detail,
        )
    if not echoes:
        dest_table.add_row(
            "(none)", "[yellow]none configured[/yellow]", "", "results stay in data_dir/results"
        )
    console.print(dest_table)

    failed = [c.name for c in checks if not c.ok] + [e.address for e in echoes if not e.ok]
    if runtime.problem is not None and runtime.problem.startswith("the active model does not load"):
        failed.append("session")
    if failed:
        err_console.print(f"[red]config-check failed:[/red] {', '.join(failed)}", highlight=False)
        raise typer.Exit(1)
    console.print("[green]config-check passed[/green]")


@app.command()
def states() -> None:
    """Print the study life cycle: the states a study goes through and what moves it on."""
    from edge_node.study import format_transitions

    console.print(format_transitions(), highlight=False)


from edge_node.uplink.commands import enroll_command  # noqa: E402 (the command lives with the uplink)

app.command("enroll")(enroll_command)

if __name__ == "__main__":
    app()
