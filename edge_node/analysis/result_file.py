"""A result object written to disk, with what a C-STORE of it needs to know (so nobody re-reads the file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ResultFile"]


@dataclass(frozen=True)
class ResultFile:
    """One SR or SC file of a run: its path, SOP class and instance, and the transfer syntax it is in."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
