"""The model registry: installed models and the activation log whose latest row is the active model.

Nothing else could rebuild these rows, so every write commits with ``synchronous=FULL`` (``durable=True``).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from edge_node.state.database import Database

__all__ = ["ModelRecord", "ModelRegistry"]


@dataclass(frozen=True)
class ModelRecord:
    row: int
    model_id: str
    version: str
    path: Path
    manifest_sha256: str
    key_fingerprint: str
    installed_at: float


class ModelRegistry:
    """The models and activations tables of one node's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def by_id(self, model_id: str, version: str) -> ModelRecord | None:
        rows = self.db.query("SELECT * FROM models WHERE model_id = ? AND version = ?", (model_id, version))
        return _model(rows[0]) if rows else None

    def add(self, model_id: str, version: str, path: Path, manifest_sha256: str, fingerprint: str) -> int:
        with self.db.tx(durable=True) as c:
            cur = c.execute(
                "INSERT INTO models (model_id, version, path, manifest_sha256, key_fingerprint, installed_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (model_id, version, str(path), manifest_sha256, fingerprint, time.time()),
            )
            return int(cur.lastrowid or 0)

    def activate(self, model_row: int, reason: str) -> None:
        """The atomic switch: the active model is the latest activation row (one INSERT, one commit)."""
        with self.db.tx(durable=True) as c:
            c.execute(
                "INSERT INTO activations (model_row, at, reason) VALUES (?, ?, ?)",
                (model_row, time.time(), reason),
            )

    def active(self) -> ModelRecord | None:
        rows = self.db.query(
            "SELECT m.* FROM activations a JOIN models m ON m.id = a.model_row ORDER BY a.id DESC LIMIT 1"
        )
        return _model(rows[0]) if rows else None

    def activation_id(self) -> int:
        """Increases with every switch; the worker compares it to notice a new active model cheaply."""
        rows = self.db.query("SELECT COALESCE(MAX(id), 0) AS n FROM activations")
        return int(rows[0]["n"])

    def previous(self) -> ModelRecord | None:
        """What ``rollback`` goes back to: the model active before the current one was made active.

        The activation log is read as a stack: an install or activation pushes its model, a rollback pops
        the current one. So a second rollback goes one further back (or finds nothing), instead of undoing
        the first.
        """
        rows = self.db.query("SELECT model_row, reason FROM activations ORDER BY id")
        stack: list[int] = []
        for r in rows:
            row = int(r["model_row"])
            if str(r["reason"]) == "rollback" and stack:
                stack.pop()
            if not stack or stack[-1] != row:
                stack.append(row)
        if len(stack) < 2:
            return None
        found = self.db.query("SELECT * FROM models WHERE id = ?", (stack[-2],))
        return _model(found[0]) if found else None

    def installed(self) -> list[ModelRecord]:
        """Every installed model, oldest first."""
        return [_model(r) for r in self.db.query("SELECT * FROM models ORDER BY id")]


def _model(r: sqlite3.Row) -> ModelRecord:
    return ModelRecord(
        row=int(r["id"]),
        model_id=str(r["model_id"]),
        version=str(r["version"]),
        path=Path(r["path"]),
        manifest_sha256=str(r["manifest_sha256"]),
        key_fingerprint=str(r["key_fingerprint"]),
        installed_at=float(r["installed_at"]),
    )
