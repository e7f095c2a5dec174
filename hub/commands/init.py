"""`fedclinic-hub init`: create the hub's data directory (keys, admin token, TLS certificate, database)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hub.commands.output import FormatOption, OutputFormat, emit, fail
from hub.commands.service_options import DataDirOption, settings_for
from hub.service.errors import HubServiceError


def init(
    data_dir: DataDirOption = None,
    public_url: Annotated[
        str | None, typer.Option("--public-url", help="Address nodes use, e.g. https://hub.example.org:8443.")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="SQLAlchemy URL (postgresql+psycopg://…); default SQLite in the dir."
        ),
    ] = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Create what is missing in the data directory and migrate the database; never overwrites a key."""
    from hub.service.datadir import init_data_dir

    settings = settings_for(data_dir, database_url=database_url, public_url=public_url)
    try:
        report = init_data_dir(settings, public_url=public_url)
    except HubServiceError as exc:
        fail(str(exc))
    payload = {
        "data_dir": str(report.data_dir),
        "database": report.database,
        "migration": report.migration,
        "key_fingerprint": report.key_fingerprint,
        "tls_sha256": report.tls_sha256,
        "admin_token_file": str(report.admin_token_file),
        "created": report.created,
    }

    def render(console: Console) -> None:
        table = Table(title="hub data directory", show_header=False)
        table.add_row("directory", str(report.data_dir))
        table.add_row("database", f"{report.database} (migration {report.migration})")
        table.add_row("signing key", report.key_fingerprint)
        table.add_row("TLS sha256", report.tls_sha256)
        table.add_row("admin token", str(report.admin_token_file))
        table.add_row("created", "\n".join(report.created) or "nothing (already initialised)")
        console.print(table)

    emit(fmt, payload, render)
