"""`fedclinic-hub status`: the federation at a glance (nodes, rounds, publications, store)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from hub.commands.output import FormatOption, OutputFormat, emit
from hub.commands.service_options import DataDirOption, database, settings_for


def status(data_dir: DataDirOption = None, fmt: FormatOption = OutputFormat.table) -> None:
    """Counts of nodes by state, rounds by state, publications, and which store is in use."""
    from hub.api.admin_routes import hub_status
    from hub.api.context import HubContext

    settings = settings_for(data_dir)
    database(settings).close()
    ctx = HubContext.build(settings)
    try:
        report = hub_status(ctx)
    finally:
        ctx.db.close()

    def render(console: Console) -> None:
        table = Table(title="hub status", show_header=False)
        for key, value in report.model_dump().items():
            table.add_row(key.replace("_", " "), str(value))
        console.print(table)

    emit(fmt, report, render)
