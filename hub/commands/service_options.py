"""Options shared by the hub service commands (init, serve, nodes, rounds, models, status)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console

from hub.service.errors import HubServiceError
from hub.service.settings import HubSettings, load_settings
from hub.store.database import Database, open_database

__all__ = ["DataDirOption", "Format", "FormatOption", "database", "fail", "print_json", "settings_for"]


class Format(str, Enum):
    TABLE = "table"
    JSON = "json"


DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="FEDCLINIC_HUB_DATA_DIR",
        help="The hub's state directory (keys, database, certificate). Default: ./hub-data.",
        show_default=False,
    ),
]
FormatOption = Annotated[Format, typer.Option("--format", help="table for people, json for scripts.")]


def fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def settings_for(data_dir: Path | None, **overrides: Any) -> HubSettings:
    try:
        settings = load_settings(data_dir, **overrides)
    except HubServiceError as exc:
        fail(str(exc))
    return settings


def database(settings: HubSettings) -> Database:
    """The migrated store of an initialised data directory."""
    if not settings.data_dir.is_dir() or not (settings.keys_dir / "hub.key").exists():
        fail(
            f"{settings.data_dir} is not a hub data directory; "
            f"run `fedclinic-hub init --data-dir {settings.data_dir}`"
        )
    return open_database(settings.db_url)


def print_json(value: BaseModel | list[BaseModel] | dict[str, Any]) -> None:
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, list):
        data = [v.model_dump(mode="json") for v in value]
    else:
        data = value
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
