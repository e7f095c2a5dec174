"""`fedclinic-install`: install, check, upgrade, remove the edge node (the kit's install.py runs it)."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from installers.answers import load_answers
from installers.errors import InstallerError, KitError
from installers.installation import Installation, check_table, ensure_answers_complete, prompt_answers
from installers.layout import Layout

__all__ = ["app"]


class ReportFormat(str, Enum):
    table = "table"
    text = "text"
    json = "json"


app = typer.Typer(
    name="fedclinic-install",
    help="Install the fedclinic edge node from a kit, check it (doctor), upgrade or remove it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True)

PrefixOption = Annotated[Path, typer.Option("--prefix", help="Where fedclinic is installed.")]
KitOption = Annotated[Path, typer.Option("--kit", help="The kit folder (install.py passes it).")]
VersionDirOption = Annotated[
    Path, typer.Option("--version-dir", help="The kit's staged version (from install.py).")
]


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(code)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise _fail(InstallerError("run the installer as root (sudo python3 install.py ...)"), 2)


@app.command()
def install(
    kit: KitOption,
    version_dir: VersionDirOption,
    prefix: PrefixOption = Path("/opt/fedclinic"),
    key_fingerprint: Annotated[
        str | None, typer.Option("--key-fingerprint", help="The kit key fingerprint install.py checked.")
    ] = None,
    answers_file: Annotated[
        Path | None, typer.Option("--answers", help="TOML answers (see answers.example.toml).")
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Unattended: ask nothing, use the answers.")
    ] = False,
    config_path: Annotated[Path | None, typer.Option("--config-path", help="Where edge.toml goes.")] = None,
    unit_dir: Annotated[Path | None, typer.Option("--unit-dir", help="Where the systemd unit goes.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="The node's data directory.")] = None,
    service_user: Annotated[str | None, typer.Option("--service-user", help="The node's user.")] = None,
) -> None:
    """The guided install (unattended with --answers and --yes); the kit's install.py starts it."""
    _require_root()
    overrides = {
        "prefix": prefix,
        "config_path": config_path,
        "unit_dir": unit_dir,
        "data_dir": data_dir,
        "service_user": service_user,
    }
    interactive = not yes and sys.stdin.isatty()
    try:
        answers = load_answers(answers_file, overrides)
        answers = ensure_answers_complete(answers, interactive, lambda a: prompt_answers(console, a))
        run = Installation(
            kit=kit.resolve(),
            layout=Layout(answers.prefix.resolve()),
            version_dir=version_dir.resolve(),
            answers=answers,
            console=console,
            interactive=interactive,
            expected_key=key_fingerprint,
        )
        run.run()
    except KitError as exc:
        raise _fail(exc, 3) from None
    except InstallerError as exc:
        raise _fail(exc) from None


@app.command()
def upgrade(
    kit: KitOption,
    version_dir: VersionDirOption,
    prefix: PrefixOption = Path("/opt/fedclinic"),
    key_fingerprint: Annotated[str | None, typer.Option("--key-fingerprint")] = None,
) -> None:
    """Switch to the new kit's version, keeping settings and data; stays on the old one if the new fails."""
    from installers.maintenance import upgrade as do_upgrade

    _require_root()
    try:
        record, problem = do_upgrade(Layout(prefix.resolve()), version_dir.resolve())
    except InstallerError as exc:
        raise _fail(exc) from None
    if problem:
        raise _fail(InstallerError(problem))
    console.print(f"[green]upgraded[/green]: now {Path(record.version_dir).name}", highlight=False)


@app.command()
def uninstall(
    prefix: PrefixOption = Path("/opt/fedclinic"),
    purge: Annotated[bool, typer.Option("--purge", help="Also delete settings, data and the user.")] = False,
) -> None:
    """Remove the service and the software; the settings and the study data stay unless --purge."""
    from installers.maintenance import uninstall as do_uninstall

    _require_root()
    try:
        removed = do_uninstall(Layout(prefix.resolve()), purge)
    except InstallerError as exc:
        raise _fail(exc) from None
    # Plain print: this program's own files are gone now, and rich imports some modules only when needed.
    print("removed: " + ", ".join(removed))


@app.command()
def doctor(
    prefix: PrefixOption = Path("/opt/fedclinic"),
    output_format: Annotated[
        ReportFormat, typer.Option("--format", help="table for people, text to send, json for scripts.")
    ] = ReportFormat.table,
    report: Annotated[Path | None, typer.Option("--report", help="Also write the text report here.")] = None,
) -> None:
    """Check everything again and print a report to send to the hub operator; exit 1 when something fails."""
    from installers.doctor import diagnose, report_text

    try:
        record, checks = diagnose(Layout(prefix.resolve()))
    except InstallerError as exc:
        raise _fail(exc) from None
    text = report_text(record, checks)
    if report is not None:
        report.write_text(text)
    if output_format is ReportFormat.json:
        print(json.dumps({"checks": [c.to_json() for c in checks]}))
    elif output_format is ReportFormat.text:
        print(text, end="")
    else:
        console.print(check_table("fedclinic doctor", checks))
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


@app.command()
def check(
    data_dir: Annotated[Path, typer.Option("--data-dir")] = Path("/var/lib/fedclinic-edge"),
    port: Annotated[int, typer.Option("--port")] = 11112,
    hub_url: Annotated[str | None, typer.Option("--hub-url")] = None,
    output_format: Annotated[
        ReportFormat, typer.Option("--format", help="table for people, json for scripts.")
    ] = ReportFormat.table,
) -> None:
    """Only the machine checks (before an install, or to compare two machines)."""
    from installers.machine import MachineProbe, run_checks

    checks = run_checks(MachineProbe(data_dir=data_dir, node_port=port, hub_url=hub_url))
    if output_format is ReportFormat.json:
        print(json.dumps({"checks": [c.to_json() for c in checks]}))
    else:
        console.print(check_table("machine checks", checks))
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)
