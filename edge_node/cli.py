"""``fedclinic-edge``: run and check the node, show its state, install or roll back models, test a PACS."""

from __future__ import annotations

import enum
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edge_node import __version__
from edge_node.errors import ConfigError, EdgeError
from edge_node.settings import EdgeSettings, config_file, load_settings

if TYPE_CHECKING:
    from edge_node.inference.model_slot import ModelSlot

__all__ = ["app"]

APP_HELP = """fedclinic edge node: receives studies from the PACS over DICOM, runs the AI model on them and
sends the result (a DICOM structured report, optionally an annotated image) back to the PACS.

Settings come from a TOML file and from FEDCLINIC_EDGE_* environment variables (a variable wins over
the file). The file is the one given with --config, else the one FEDCLINIC_EDGE_CONFIG names, else
/etc/fedclinic/edge.toml; paths in it are relative to the file. Patient data never leaves this machine.

First setup, step by step:

  fedclinic-edge config-check --config /etc/fedclinic/edge.toml

  fedclinic-edge install-bundle bundle.zip --config /etc/fedclinic/edge.toml

  fedclinic-edge serve --config /etc/fedclinic/edge.toml

Then, at any time: fedclinic-edge status --config /etc/fedclinic/edge.toml

For scripts: status, config-check, echo and models take --format json. Exit codes: 0 success; 1 the
check or the operation failed (a PACS does not answer, a bundle is refused, nothing to roll back to);
2 the settings or the command line are wrong; 3 nothing to report yet (no node has run on data_dir)."""

app = typer.Typer(
    name="fedclinic-edge",
    help=APP_HELP,
    rich_markup_mode="markdown",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_FAILED, EXIT_USAGE, EXIT_NO_STATE = 1, 2, 3


class OutputFormat(str, enum.Enum):
    text = "text"
    json = "json"


FormatOption = Annotated[
    OutputFormat, typer.Option("--format", help="text for people, json for scripts (stable keys).")
]


def _print_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=1, default=str))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedclinic-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML settings file (default: $FEDCLINIC_EDGE_CONFIG, else /etc/fedclinic/edge.toml); "
        "FEDCLINIC_EDGE_* environment variables override it.",
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
    # A failed association request is reported once by the sender (or echo) with its reason; pynetdicom's
    # own lines for it would repeat on every retry.
    from edge_node.delivery.association_failure import PYNETDICOM_REQUESTOR_LOGGERS, RequestorNoiseFilter

    for name in PYNETDICOM_REQUESTOR_LOGGERS:
        logging.getLogger(name).addFilter(RequestorNoiseFilter())
    if service:
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
    # No element value of an input reaches a log line, whatever library or exception text carries it.
    from edge_node.log_privacy import install_log_privacy

    install_log_privacy()


def _settings(config: Path | None) -> EdgeSettings:
    try:
        return load_settings(config_file(config))
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None


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
    output: FormatOption = OutputFormat.text,
) -> None:
    """Show whether the node runs, the model in use (and the processor it really runs on), totals, how many
    recent images lay outside each model's input envelope (with a warning when far more than chance) and the
    recent studies.

    Study identifiers are shown only as short hashes, never as patient data. "runs on CPUExecutionProvider"
    next to a GPU setting means the GPU libraries did not load: the node works, but slower. Exit code 3 when
    no node has run on this data directory yet.

    Example: fedclinic-edge status --config /etc/fedclinic/edge.toml --limit 50 --format json
    """
    settings = _settings(config)
    from edge_node.state.node_state import NodeState
    from edge_node.status_report import StatusReport

    if not settings.db_path.is_file():
        raise _fail(
            ConfigError(f"no edge database at {settings.db_path}; has `fedclinic-edge serve` run here?"),
            EXIT_NO_STATE,
        )
    state = NodeState.open(settings.db_path)
    try:
        report = StatusReport.collect(settings, state, limit)
    finally:
        state.close()
    from edge_node.uplink.commands import print_uplink_status, uplink_status

    if output is OutputFormat.json:
        _print_json({**report.to_json(), "hub": uplink_status(settings)})
    else:
        report.print_text(console)
        print_uplink_status(console, settings)


def _model_slot(settings: EdgeSettings) -> ModelSlot:
    from edge_node.inference.model_slot import ModelSlot
    from edge_node.state.database import Database
    from edge_node.state.model_registry import ModelRegistry

    return ModelSlot.from_settings(ModelRegistry(Database(settings.db_path)), settings)


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
        slot.registry.db.close()
    console.print(
        f"[green]installed[/green] {record.model_id} {record.version} "
        f"(signed by key {record.key_fingerprint}); "
        "a running node switches to it before its next study"
    )


@app.command()
def rollback(config: ConfigOption = None) -> None:
    """Go back to the model that was active before the current one (a running node switches too).

    A second rollback goes one model further back, or says there is none; it does not undo the first.

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
        slot.registry.db.close()
    console.print(f"[green]active again:[/green] {record.model_id} {record.version}")


@app.command()
def models(config: ConfigOption = None, output: FormatOption = OutputFormat.text) -> None:
    """List the installed model bundles and which one is active.

    Example: fedclinic-edge models --config /etc/fedclinic/edge.toml
    """
    settings = _settings(config)
    from edge_node.state.database import Database
    from edge_node.state.model_registry import ModelRegistry

    if not settings.db_path.is_file():
        raise _fail(
            ConfigError(f"no edge database at {settings.db_path}; install a bundle first"), EXIT_NO_STATE
        )
    db = Database(settings.db_path)
    try:
        registry = ModelRegistry(db)
        installed, active, previous = registry.installed(), registry.active(), registry.previous()
    finally:
        db.close()
    active_row = active.row if active is not None else None
    previous_row = previous.row if previous is not None else None
    if output is OutputFormat.json:
        _print_json(
            {
                "active": None
                if active is None
                else {"model_id": active.model_id, "version": active.version},
                "rollback_to": None
                if previous is None
                else {"model_id": previous.model_id, "version": previous.version},
                "installed": [
                    {
                        "model_id": m.model_id,
                        "version": m.version,
                        "path": str(m.path),
                        "key_fingerprint": m.key_fingerprint,
                        "installed_at": m.installed_at,
                        "active": m.row == active_row,
                    }
                    for m in installed
                ],
            }
        )
        return
    if not installed:
        console.print("no model installed (fedclinic-edge install-bundle PATH)")
        return
    table = Table(title="installed models")
    for column in ("model", "version", "", "signed by key", "installed"):
        table.add_column(column, overflow="fold")
    for m in installed:
        mark = "active" if m.row == active_row else "rollback target" if m.row == previous_row else ""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.installed_at))
        table.add_row(m.model_id, m.version, mark, m.key_fingerprint, when)
    console.print(table)


@app.command()
def echo(
    host: Annotated[
        str | None, typer.Argument(help="PACS host name or address (default: this node).")
    ] = None,
    port: Annotated[int | None, typer.Argument(help="PACS DICOM port (default: this node's).")] = None,
    ae: Annotated[str | None, typer.Argument(help="The PACS's AE title, the called AE.")] = None,
    calling_ae: Annotated[str | None, typer.Option(help="Our AE title as the PACS knows it.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 10.0,
    wait: Annotated[
        float, typer.Option(help="Retry for up to this many seconds until it answers (0: one try).")
    ] = 0.0,
    config: ConfigOption = None,
    output: FormatOption = OutputFormat.text,
) -> None:
    """Test a DICOM connection with C-ECHO (a "DICOM ping"); exit code 0 when it answers success.

    Without HOST, PORT and AE it echoes this node's own listener (from the settings): with --wait, a
    script waits until a (re)started node takes studies. A failure names its reason: connection refused,
    timed out, called or calling AE title not recognised.

    Example: fedclinic-edge echo 10.0.0.5 104 PACS --calling-ae FEDCLINIC
    """
    _setup_logging("ERROR")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the failure is reported below, in words
    from edge_node.config_check import c_echo
    from edge_node.delivery.destination import Destination
    from edge_node.settings import DestinationSettings

    if host is None or port is None or ae is None:
        if any(v is not None for v in (host, port, ae)):
            raise _fail(EdgeError("give HOST, PORT and AE together, or none to echo this node"), EXIT_USAGE)
        settings = _settings(config)
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
        port, ae = settings.port, settings.ae_title
        if calling_ae is None and settings.allowed_calling_aes:
            calling_ae = settings.allowed_calling_aes[0]
    calling = calling_ae or "FEDCLINIC"
    try:
        dest = DestinationSettings(ae_title=ae, host=host, port=port)
        DestinationSettings(ae_title=calling, host=host, port=port)
    except ValueError as exc:
        raise _fail(EdgeError(f"invalid AE title or port: {exc}"), EXIT_USAGE) from None
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        result = c_echo(Destination(dest.ae_title, dest.host, dest.port), calling, timeout=timeout)
        if result.ok or time.monotonic() >= deadline:
            break
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    if output is OutputFormat.json:
        _print_json(
            {"ok": result.ok, "address": result.address, "detail": result.detail, "ms": result.milliseconds}
        )
        if not result.ok:
            raise typer.Exit(EXIT_FAILED)
        return
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
    output: FormatOption = OutputFormat.text,
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
    runtime = check_runtime(settings)
    echoes = check_destinations(settings, timeout=timeout)
    failed = [c.name for c in checks if not c.ok] + [e.address for e in echoes if not e.ok]
    if runtime.problem is not None and runtime.problem.startswith("the active model does not load"):
        failed.append("session")
    source = config_file(config)
    if output is OutputFormat.json:
        _print_json(
            {
                "ok": not failed,
                "failed": failed,
                "settings": str(source) if source else None,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
                "runtime": {
                    "available": runtime.available,
                    "configured": runtime.configured,
                    "session_provider": runtime.session_provider,
                    "requested_provider": runtime.requested_provider,
                    "fell_back": runtime.fell_back,
                    "model": runtime.model,
                    "problem": runtime.problem,
                },
                "destinations": [
                    {"address": e.address, "ok": e.ok, "detail": e.detail, "ms": e.milliseconds}
                    for e in echoes
                ],
            }
        )
        if failed:
            raise typer.Exit(EXIT_FAILED)
        return

    table = Table(title="node")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")  # paths and provider names are never cut off
    table.add_row("settings", "[green]ok[/green]", str(source) if source else "environment only")
    for check in checks:
        table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAILED[/red]", check.detail)
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
    if failed:
        err_console.print(f"[red]config-check failed:[/red] {', '.join(failed)}", highlight=False)
        raise typer.Exit(EXIT_FAILED)
    console.print("[green]config-check passed[/green]")


@app.command()
def states() -> None:
    """Print the study life cycle: the states a study goes through and what moves it on."""
    from edge_node.state.lifecycle import format_transitions

    console.print(format_transitions(), highlight=False)


from edge_node.uplink.commands import (  # noqa: E402 (the commands live with the uplink)
    credential_app,
    enroll_command,
    updates_command,
)

app.command("enroll")(enroll_command)
app.command("updates")(updates_command)
app.add_typer(credential_app, name="credential")

if __name__ == "__main__":
    app()


spool_app = typer.Typer(help="The spool of received instances: what it keeps and for how long.")
app.add_typer(spool_app, name="spool")


@spool_app.command("purge")
def spool_purge(
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
    output: FormatOption = OutputFormat.text,
) -> None:
    """Remove the received instances of finished studies that spool_retention_days or spool_max_bytes let go.

    A study still receiving, waiting or in analysis keeps every instance; its results and history stay.
    A labeled study (what the node learns from) stays until its latest label is labeled_retention_days old.
    Safe while the node runs. The node also does this by itself every spool_purge_interval_seconds.

    Example: fedclinic-edge spool purge --dry-run --config /etc/fedclinic/edge.toml --format json
    """
    settings = _settings(config)
    _setup_logging("WARNING")
    from edge_node.ingest.retention import purge_spool
    from edge_node.ingest.spool import Spool
    from edge_node.state.node_state import NodeState

    if not settings.db_path.is_file():
        raise _fail(
            ConfigError(f"no edge database at {settings.db_path}; has `fedclinic-edge serve` run here?"),
            EXIT_NO_STATE,
        )
    state = NodeState.open(settings.db_path)
    try:
        spool = Spool(
            settings.spool_dir,
            state.ingest,
            max_instance_bytes=settings.max_instance_bytes,
            min_free_bytes=settings.min_free_bytes,
        )
        report = purge_spool(spool, settings.retention_policy, dry_run=dry_run)
    except EdgeError as exc:
        raise _fail(exc) from None
    finally:
        state.close()
    if output is OutputFormat.json:
        _print_json(report.to_json())
        return
    table = Table(title="spool purge (dry run)" if dry_run else "spool purge")
    for column in ("studies", "instances", "bytes", "bytes left"):
        table.add_column(column, justify="right")
    table.add_row(*(str(v) for v in (report.studies, report.instances, report.bytes, report.bytes_left)))
    console.print(table)


labels_app = typer.Typer(
    help="The clinic's labels: import a labeled archive, list them, export them for audit."
)
app.add_typer(labels_app, name="labels")


class ListFormat(str, enum.Enum):
    table = "table"
    json = "json"


def _open_state(settings: EdgeSettings) -> Any:
    from edge_node.state.node_state import NodeState

    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(
            ConfigError(f"data_dir {settings.data_dir} cannot be created ({exc.strerror})"), 2
        ) from None
    return NodeState.open(settings.db_path)


@labels_app.command("import")
def labels_import(
    source: Annotated[
        Path,
        typer.Argument(
            help="A labels CSV (study_instance_uid or sop_instance_uid, label) or a folder of DICOM files "
            "with its labels.csv."
        ),
    ],
    config: ConfigOption = None,
    output: FormatOption = OutputFormat.text,
) -> None:
    """Import labels: a CSV for studies this node already has, or a hospital archive folder.

    A folder's DICOM files go into the node's spool like studies from the PACS and are analysed like them
    (by a running node when the next study arrives, else at its next start); its labels.csv labels them.
    Labels are class names of the installed model's task. Everything is checked first: one bad row or file
    and nothing is imported (each problem is listed with its line or file name). Importing the same
    archive again changes nothing.

    Example: fedclinic-edge labels import /media/archive --config /etc/fedclinic/edge.toml
    """
    settings = _settings(config)
    _setup_logging("WARNING")
    from rich.progress import Progress

    from edge_node.ingest.spool import Spool
    from edge_node.learning.labeled_archive import ArchiveRefused, import_labels
    from edge_node.state.labels import LabelStore

    state = _open_state(settings)
    try:
        spool = Spool(
            settings.spool_dir,
            state.ingest,
            max_instance_bytes=settings.max_instance_bytes,
            min_free_bytes=settings.min_free_bytes,
        )
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("spooling the archive's files", total=None)
            report = import_labels(
                source,
                spool,
                LabelStore(state.db),
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except ArchiveRefused as exc:
        if output is OutputFormat.json:
            _print_json({"ok": False, "problems": exc.problems})
            raise typer.Exit(EXIT_FAILED) from None
        raise _fail(exc) from None
    except EdgeError as exc:
        raise _fail(exc) from None
    finally:
        state.close()
    if output is OutputFormat.json:
        _print_json({"ok": True, **report.to_json()})
        return
    console.print(
        f"[green]imported[/green] {report.rows} label rows ({report.labels_changed} new or changed); "
        f"{report.files} files ({report.spooled} spooled, {report.already_spooled} already there) "
        f"in {report.studies} studies",
        highlight=False,
    )


@labels_app.command("list")
def labels_list(
    config: ConfigOption = None,
    output: Annotated[
        ListFormat, typer.Option("--format", help="table for people, json for scripts (stable keys).")
    ] = ListFormat.table,
) -> None:
    """List the labels in force: on which study or instance, which class, from where, by whom, when.

    The table shows UIDs as short hashes (as status does); json gives the UIDs.

    Example: fedclinic-edge labels list --format json --config /etc/fedclinic/edge.toml
    """
    settings = _settings(config)
    from edge_node.state.labels import LabelStore

    if not settings.db_path.is_file():
        raise _fail(ConfigError(f"no edge database at {settings.db_path}; no labels yet"), EXIT_NO_STATE)
    state = _open_state(settings)
    try:
        store = LabelStore(state.db)
        records = store.labels()
        hashes = {r.uid: state.db.uid_hash(r.uid) for r in records}
        usable = len(store.labeled_instances())
    finally:
        state.close()
    if output is ListFormat.json:
        _print_json(
            {
                "labels": [
                    {
                        "scope": r.scope,
                        "uid": r.uid,
                        "label": r.label,
                        "source": r.source,
                        "who": r.who,
                        "labeled_at": r.labeled_at,
                    }
                    for r in records
                ],
                "labeled_instances": usable,
            }
        )
        return
    if not records:
        console.print("no labels yet (the local page, or fedclinic-edge labels import PATH)")
        return
    table = Table(title=f"labels ({usable} labeled instances in the spool)")
    for column in ("on", "uid (hash)", "label", "source", "by", "when"):
        table.add_column(column, overflow="fold")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.labeled_at))
        table.add_row(r.scope, hashes[r.uid], r.label, r.source, r.who, when)
    console.print(table)


@labels_app.command("export")
def labels_export(
    config: ConfigOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="CSV file to write (default: standard output).")
    ] = None,
    history: Annotated[
        bool, typer.Option("--history", help="Every change ever made (with the label it replaced).")
    ] = False,
) -> None:
    """Write the labels as CSV for audit: the labels in force (re-importable), or with --history every change.

    Example: fedclinic-edge labels export --out labels-audit.csv --config /etc/fedclinic/edge.toml
    """
    settings = _settings(config)
    import csv
    import io
    from datetime import datetime, timezone

    from edge_node.state.labels import LabelStore

    if not settings.db_path.is_file():
        raise _fail(ConfigError(f"no edge database at {settings.db_path}; no labels yet"), EXIT_NO_STATE)
    state = _open_state(settings)
    try:
        store = LabelStore(state.db)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")

        def iso(at: float) -> str:
            return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")

        def uids(scope: str, uid: str) -> list[str]:
            return [uid, ""] if scope == "study" else ["", uid]

        if history:
            writer.writerow(
                ["study_instance_uid", "sop_instance_uid", "label", "previous", "source", "who", "at"]
            )
            for c in store.history():
                writer.writerow(
                    [*uids(c.scope, c.uid), c.label, c.previous or "", c.source, c.who, iso(c.at)]
                )
        else:
            writer.writerow(
                ["study_instance_uid", "sop_instance_uid", "label", "source", "who", "labeled_at"]
            )
            for r in store.labels():
                writer.writerow([*uids(r.scope, r.uid), r.label, r.source, r.who, iso(r.labeled_at)])
    finally:
        state.close()
    if out is None:
        typer.echo(buffer.getvalue(), nl=False)
        return
    try:
        out.write_text(buffer.getvalue(), encoding="utf-8")
    except OSError as exc:
        raise _fail(EdgeError(f"cannot write {out}: {exc.strerror}")) from None
    err_console.print(f"wrote {out}", highlight=False)


@app.command()
def page(config: ConfigOption = None) -> None:
    """Serve only the clinician page (no DICOM listener, no analysis), until Ctrl-C.

    `fedclinic-edge serve` serves the page too; this runs it alone, e.g. to look at labels while the node
    is stopped. It listens on page_host:page_port.

    Example: fedclinic-edge page --config /etc/fedclinic/edge.toml
    """
    settings = _settings(config)
    _setup_logging(settings.log_level, service=True)
    import threading

    from edge_node.page.server import ClinicianPage, PageConfig

    state = _open_state(settings)
    page_server = ClinicianPage(PageConfig.from_settings(settings), state.db)
    try:
        host, port = page_server.start()
    except (EdgeError, OSError) as exc:
        state.close()
        raise _fail(exc) from None
    err_console.print(f"clinician page on http://{host}:{port}/ (Ctrl-C stops it)", highlight=False)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        page_server.stop()
        state.close()


@app.command("page-password")
def page_password() -> None:
    """Make the clinician page's password hash (asked twice, never shown); prints the setting to add.

    Put the printed line in the node's TOML settings (or FEDCLINIC_EDGE_PAGE_PASSWORD_HASH): the node
    stores only this salted scrypt hash. A password is required to set page_host to a LAN address.

    Example: fedclinic-edge page-password >> /etc/fedclinic/edge.toml
    """
    from edge_node.page.password import hash_password

    password = typer.prompt("page password", hide_input=True, confirmation_prompt=True, err=True)
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        raise _fail(EdgeError(str(exc)), EXIT_USAGE) from None
    typer.echo(f'page_password_hash = "{hashed}"')
