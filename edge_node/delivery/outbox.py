"""The outbox: result files waiting to be sent to a destination, their attempts and next retry time.

Entries are written in the transaction that finishes a run (``enqueue``), so an interrupted run sent
nothing. Losing the last outbox commits to a power cut re-sends a result, which is idempotent (see
``worker.Sender``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_node.store import Store

__all__ = ["Outbox", "OutboxItem", "enqueue"]


@dataclass(frozen=True)
class OutboxItem:
    id: int
    run_id: int
    study_id: int
    path: Path
    dest_ae: str
    dest_host: str
    dest_port: int
    attempts: int


def enqueue(
    c: sqlite3.Connection,
    run_id: int,
    study_id: int,
    outputs: Sequence[Path],
    destinations: Sequence[tuple[str, str, int]],
    now: float,
) -> int:
    """Add one entry per output file and destination inside the caller's transaction; return how many."""
    rows = [
        (run_id, study_id, str(p), ae, host, port, now, now)
        for p in outputs
        for (ae, host, port) in destinations
    ]
    c.executemany(
        "INSERT INTO outbox (run_id, study_id, path, dest_ae, dest_host, dest_port, next_try,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    return len(rows)


class Outbox:
    """The outbox table of one ``Store``: what is due, and the bookkeeping of each send attempt."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def due(self, now: float | None = None, limit: int = 200) -> list[OutboxItem]:
        now = time.time() if now is None else now
        rows = self.store.query(
            "SELECT id, run_id, study_id, path, dest_ae, dest_host, dest_port, attempts FROM outbox"
            " WHERE state = 'pending' AND next_try <= ? ORDER BY next_try, id LIMIT ?",
            (now, limit),
        )
        return [
            OutboxItem(
                int(r["id"]),
                int(r["run_id"]),
                int(r["study_id"]),
                Path(r["path"]),
                str(r["dest_ae"]),
                str(r["dest_host"]),
                int(r["dest_port"]),
                int(r["attempts"]),
            )
            for r in rows
        ]

    def next_try(self) -> float | None:
        rows = self.store.query("SELECT MIN(next_try) AS t FROM outbox WHERE state = 'pending'")
        t = rows[0]["t"]
        return None if t is None else float(t)

    def mark_sent(self, ids: Sequence[int], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.store.tx() as c:
            c.executemany(
                "UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1, last_error = NULL"
                " WHERE id = ?",
                [(now, i) for i in ids],
            )
            c.execute(
                "UPDATE studies SET results = 'sent' WHERE results = 'pending' AND id NOT IN"
                " (SELECT study_id FROM outbox WHERE state = 'pending')"
            )

    def mark_retry(self, ids: Sequence[int], error: str, next_try: Sequence[float]) -> None:
        with self.store.tx() as c:
            c.executemany(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_try = ? WHERE id = ?",
                [(error, t, i) for i, t in zip(ids, next_try, strict=True)],
            )

    def last_error(self) -> str | None:
        rows = self.store.query(
            "SELECT last_error FROM outbox WHERE state = 'pending' AND last_error IS NOT NULL"
            " ORDER BY id DESC LIMIT 1"
        )
        return str(rows[0]["last_error"]) if rows else None
