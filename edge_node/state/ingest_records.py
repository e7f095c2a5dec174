"""Ingest records: a spooled instance becomes a row and moves its study on; a release queues the study."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_node.state.database import Database
from edge_node.state.lifecycle import StudyEvent, StudyState, next_state

__all__ = ["IngestRecords", "InstanceRecord"]


@dataclass(frozen=True)
class InstanceRecord:
    """What the spool learnt of one instance from its header, and where the file lies."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str | None
    path: Path
    size: int
    calling_ae: str


class IngestRecords:
    """The studies and instances tables as the listener and the spool write them."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> tuple[int, Path | None]:
        """Record a spooled instance; returns (study row id, a superseded spool file to delete, if any)."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = c.execute(
                "SELECT id, state, revision FROM studies WHERE study_uid = ?", (rec.study_uid,)
            ).fetchone()
            if row is None:
                cur = c.execute(
                    "INSERT INTO studies (study_uid, state, revision, first_received_at, last_instance_at,"
                    " updated_at) VALUES (?, ?, 1, ?, ?, ?)",
                    (rec.study_uid, StudyState.RECEIVED.value, now, now, now),
                )
                study_id, revision = int(cur.lastrowid or 0), 1
            else:
                study_id, revision = int(row["id"]), int(row["revision"]) + 1
                state = next_state(StudyState(row["state"]), StudyEvent.INSTANCE)
                c.execute(
                    "UPDATE studies SET state = ?, revision = ?, last_instance_at = ?, updated_at = ?"
                    " WHERE id = ?",
                    (state.value, revision, now, now, study_id),
                )
            old = c.execute(
                "SELECT path FROM instances WHERE sop_instance_uid = ?", (rec.sop_instance_uid,)
            ).fetchone()
            c.execute(
                "INSERT INTO instances (study_id, series_uid, sop_instance_uid, sop_class_uid,"
                " transfer_syntax, modality, path, size, calling_ae, received_at, revision, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'spooled')"
                " ON CONFLICT (sop_instance_uid) DO UPDATE SET study_id = excluded.study_id,"
                " series_uid = excluded.series_uid, sop_class_uid = excluded.sop_class_uid,"
                " transfer_syntax = excluded.transfer_syntax, modality = excluded.modality,"
                " path = excluded.path,"
                " size = excluded.size, calling_ae = excluded.calling_ae, received_at = excluded.received_at,"
                " revision = excluded.revision, state = 'spooled'",
                (
                    study_id,
                    rec.series_uid,
                    rec.sop_instance_uid,
                    rec.sop_class_uid,
                    rec.transfer_syntax,
                    rec.modality,
                    str(rec.path),
                    rec.size,
                    rec.calling_ae,
                    now,
                    revision,
                ),
            )
        superseded = Path(old["path"]) if old is not None and Path(old["path"]) != rec.path else None
        return study_id, superseded

    def mark_complete(self, study_ids: Sequence[int]) -> int:
        """The association that sent these studies was released: queue those still receiving."""
        queued = 0
        now = time.time()
        with self.db.tx() as c:
            for study_id in study_ids:
                row = c.execute("SELECT state FROM studies WHERE id = ?", (study_id,)).fetchone()
                if row is None:
                    continue
                before = StudyState(row["state"])
                after = next_state(before, StudyEvent.COMPLETE)
                if after != before:
                    c.execute(
                        "UPDATE studies SET state = ?, updated_at = ? WHERE id = ?",
                        (after.value, now, study_id),
                    )
                    queued += 1
        return queued

    def spool_sizes(self) -> dict[Path, int]:
        """Every spooled file with a row, and the size recorded for it."""
        return {Path(r["path"]): int(r["size"]) for r in self.db.query("SELECT path, size FROM instances")}

    def spool_paths(self) -> set[Path]:
        """Every spooled file with a row (the spool's recovery indexes the others)."""
        return {Path(r["path"]) for r in self.db.query("SELECT path FROM instances")}
