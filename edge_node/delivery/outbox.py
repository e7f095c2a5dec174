"""The outbox: one row per result file and destination, retried until the destination has it."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_node.analysis.result_file import ResultFile
from edge_node.delivery.destination import Destination
from edge_node.state.database import Database
from edge_node.state.runs import settle_sent_results

__all__ = ["Outbox", "OutboxItem"]


@dataclass(frozen=True)
class OutboxItem:
    id: int
    run_id: int
    study_id: int
    file: ResultFile
    destination: Destination
    attempts: int


class Outbox:
    """The outbox table of one node's database: filling it, what is due, and each send attempt's outcome."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def enqueue(
        c: sqlite3.Connection,
        run_id: int,
        study_id: int,
        outputs: Sequence[ResultFile],
        destinations: Sequence[Destination],
        now: float,
    ) -> int:
        """Add one entry per result file and destination inside the caller's transaction; return how many."""
        rows = [
            (
                run_id,
                study_id,
                str(f.path),
                f.sop_class_uid,
                f.sop_instance_uid,
                f.transfer_syntax,
                d.ae_title,
                d.host,
                d.port,
                now,
                now,
            )
            for f in outputs
            for d in destinations
        ]
        c.executemany(
            "INSERT INTO outbox (run_id, study_id, path, sop_class_uid, sop_instance_uid, transfer_syntax,"
            " dest_ae, dest_host, dest_port, next_try, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return len(rows)

    def due(self, now: float | None = None, limit: int = 200) -> list[OutboxItem]:
        now = time.time() if now is None else now
        rows = self.db.query(
            "SELECT id, run_id, study_id, path, sop_class_uid, sop_instance_uid, transfer_syntax, dest_ae,"
            " dest_host, dest_port, attempts FROM outbox"
            " WHERE state = 'pending' AND next_try <= ? ORDER BY next_try, id LIMIT ?",
            (now, limit),
        )
        return [
            OutboxItem(
                id=int(r["id"]),
                run_id=int(r["run_id"]),
                study_id=int(r["study_id"]),
                file=ResultFile(
                    Path(r["path"]),
                    str(r["sop_class_uid"]),
                    str(r["sop_instance_uid"]),
                    str(r["transfer_syntax"]),
                ),
                destination=Destination(str(r["dest_ae"]), str(r["dest_host"]), int(r["dest_port"])),
                attempts=int(r["attempts"]),
            )
            for r in rows
        ]

    def next_try(self) -> float | None:
        rows = self.db.query("SELECT MIN(next_try) AS t FROM outbox WHERE state = 'pending'")
        t = rows[0]["t"]
        return None if t is None else float(t)

    def mark_sent(self, ids: Sequence[int], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.tx() as c:
            c.executemany(
                "UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1, last_error = NULL"
                " WHERE id = ?",
                [(now, i) for i in ids],
            )
            settle_sent_results(c)

    def mark_retry(self, ids: Sequence[int], error: str, next_try: Sequence[float]) -> None:
        with self.db.tx() as c:
            c.executemany(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_try = ? WHERE id = ?",
                [(error, t, i) for i, t in zip(ids, next_try, strict=True)],
            )
