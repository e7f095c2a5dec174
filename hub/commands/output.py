"""How a command reports: a rich table for people, or one JSON document on stdout for scripts.

Exit codes are stable: 0 done, 1 the work failed (the message says why), 2 bad usage (a wrong option or
value; Click's own code).
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Mapping
from typing import Annotated, Any

import typer

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "FormatOption", "OutputFormat", "emit_json"]

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


def emit_json(doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as JSON to stdout, unstyled, so that ``json.loads`` of the whole output gives it back."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()
