"""Errors of the node's protection layer.

ProtectionError (an EdgeError)
 ├── TaskRefused       a task is below the clinic's privacy floor or would pass its budget (``reason``)
 └── LedgerError       the privacy ledger cannot be read or written (the task is not sent)
"""

from __future__ import annotations

from edge_node.errors import EdgeError

__all__ = ["LedgerError", "ProtectionError", "TaskRefused"]


class ProtectionError(EdgeError):
    """Base of the protection layer's errors."""


class TaskRefused(ProtectionError):
    """The clinic refuses this task; ``reason`` is the plain sentence the hub records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LedgerError(ProtectionError):
    """The privacy ledger file is unreadable or unwritable; fix the data directory and retry."""
