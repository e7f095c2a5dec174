"""How every hub command reports: a rich rendering for people, or one JSON document on stdout for scripts.

Exit codes are stable: 0 done, 1 the work failed (the message says why), 2 bad usage (a wrong option or
value; Click's own code) or, for ``rounds status``, a round that ended failed.
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console, RenderableType

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "FormatOption",
    "JsonPayload",
    "OutputFormat",
    "Render",
    "emit",
    "emit_json",
    "emit_list",
    "fail",
]

EXIT_FAILED = 1
EXIT_USAGE = 2


class OutputFormat(str, enum.Enum):
    """``table`` for people (rich), ``json`` for scripts."""

    table = "table"
    json = "json"


FormatOption = Annotated[
    OutputFormat,
    typer.Option("--format", help="table for people; json prints one JSON document on stdout for scripts."),
]

JsonPayload = BaseModel | Sequence[BaseModel] | Mapping[str, Any]
"""What a command reports: a wire model, a list of them, or a plain mapping."""

Render = Callable[[Console], None]
"""Draws the human form of a report on the console it is given."""

ItemT = TypeVar("ItemT", bound=BaseModel)


def _plain(payload: JsonPayload) -> Any:
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json")
    if isinstance(payload, Mapping):
        return payload
    return [item.model_dump(mode="json") for item in payload]


def emit_json(payload: JsonPayload) -> None:
    """Write ``payload`` as JSON to stdout, unstyled: ``json.loads`` of the whole output gives it back."""
    sys.stdout.write(json.dumps(_plain(payload), indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def emit(fmt: OutputFormat, payload: JsonPayload, render: Render) -> None:
    """Report ``payload`` as JSON, or draw it with ``render`` on stdout for people."""
    if fmt is OutputFormat.json:
        emit_json(payload)
    else:
        render(Console())


def emit_list(
    fmt: OutputFormat, name: str, items: Sequence[ItemT], table: Callable[[Sequence[ItemT]], RenderableType]
) -> None:
    """Report a listing: ``{name: [item, ...]}`` as JSON, or ``table(items)`` for people."""
    payload = {name: [item.model_dump(mode="json") for item in items]}
    emit(fmt, payload, lambda console: console.print(table(items)))


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Say what went wrong on stderr (stdout stays clean for JSON) and stop with ``code``."""
    Console(stderr=True).print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)
