"""The update outbox: answers to hub tasks, kept in SQLite until the hub confirms it has them.

An answer is written (envelope + npz payload, fsync'd by SQLite's FULL synchronous mode) before the node tries
to send it, so a crash or a hub outage loses nothing; sending is idempotent per task at the hub, so a reply
lost after the hub stored the update only costs a resend. An update the hub refuses for good (a validation
error, a closed round) is kept with the hub's reason, not retried.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OutboxEntry", "UpdateOutbox"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL UNIQUE,
    envelope TEXT NOT NULL,
    payload BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'refused')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS updates_due ON updates (state, next_try);
"""


@dataclass(frozen=True)
class OutboxEntry:
    """One update waiting for the hub (``envelope`` is the JSON the hub receives beside ``payload``)."""

    id: int
    task_id: str
    envelope: str
    payload: bytes
    attempts: int


class UpdateOutbox:
    """A small SQLite database of its own (``data_dir/uplink/outbox.sqlite3``), safe across threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an answer the node accepted survives a power cut
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def put(self, task_id: str, envelope: str, payload: bytes, now: float | None = None) -> bool:
        """Keep the answer to ``task_id``; False when that task was answered already (nothing changes)."""
        now = time.time() if now is None else now
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO updates (task_id, envelope, payload, next_try, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (task_id, envelope, payload, now, now),
            )
            return cur.rowcount == 1

    def has(self, task_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM updates WHERE task_id = ?", (task_id,)).fetchone()
        return row is not None

    def due(self, now: float | None = None, limit: int = 50) -> list[OutboxEntry]:
        """Pending answers whose next try has come, oldest first."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT id, task_id, envelope, payload, attempts FROM updates"
                " WHERE state = 'pending' AND next_try <= ? ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [OutboxEntry(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    def next_try(self) -> float | None:
        """When the earliest pending answer is due (None when nothing waits)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(next_try) FROM updates WHERE state = 'pending'").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def mark_sent(self, entry_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute(
                "UPDATE updates SET state = 'sent', attempts = attempts + 1, done_at = ?, last_error = NULL"
                " WHERE id = ?",
                (now, entry_id),
            )

    def mark_refused(self, entry_id: int, reason: str, now: float | None = None) -> None:
        """The hub will never take this answer (kept, with the reason, for ``status``)."""
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute(
                "UPDATE updates SET state = 'refused', attempts = attempts + 1, done_at = ?, last_error = ?"
                " WHERE id = ?",
                (now, reason, entry_id),
            )

    def mark_retry(self, entry_id: int, error: str, next_try: float) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE updates SET attempts = attempts + 1, next_try = ?, last_error = ? WHERE id = ?",
                (next_try, error, entry_id),
            )

    def counts(self) -> dict[str, int]:
        """Answers by state: pending, sent, refused."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM updates GROUP BY state").fetchall()
        counts = {"pending": 0, "sent": 0, "refused": 0}
        counts.update({str(r[0]): int(r[1]) for r in rows})
        return counts
