"""Claims and runs: the worker takes a ready study with its instance rows, and records how the run ended."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_node.state.database import Database
from edge_node.state.envelope_monitor import EnvelopeResult, record_envelope_results
from edge_node.state.lifecycle import StudyEvent, StudyState, next_state

__all__ = ["Claim", "FindingRow", "InstanceRow", "ModelInUse", "ReportRef", "Runs", "settle_sent_results"]


@dataclass(frozen=True)
class InstanceRow:
    """One spooled instance as the claim carries it: what ingest learnt, so analysis need not re-learn it."""

    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str | None
    path: Path


@dataclass(frozen=True)
class Claim:
    """A study the worker owns until it finishes the run, with the rows of all its instances."""

    run_id: int
    study_id: int
    study_uid: str
    revision: int
    instances: list[InstanceRow]


@dataclass(frozen=True)
class FindingRow:
    """One image's finding as a run records it."""

    sop_instance_uid: str
    score: float
    label: str
    #: The image's input envelope result; None when the model has no envelope.
    envelope: EnvelopeResult | None = None


@dataclass(frozen=True)
class ReportRef:
    """The SR a run sent: a later run's SR names it as its predecessor (PS3.3 C.17.2.3)."""

    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class ModelInUse:
    """The model a run used, as recorded with the run."""

    model_id: str
    model_version: str
    provider: str
    #: The quantile of the model's input envelope (what share of images like its validation images lie
    #: within it); None when the bundle has no envelope.
    envelope_quantile: float | None = None


#: Ready: released and quiet for the settle time, or still receiving and quiet for the (longer) quiet time.
_READY = "(state = 'queued' AND last_instance_at <= ?) OR (state = 'received' AND last_instance_at <= ?)"


class Runs:
    """The runs and findings tables, and the study transitions a run makes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def claim_next(
        self, quiet_seconds: float, now: float | None = None, *, settle_seconds: float = 0.0
    ) -> Claim | None:
        """Take the next ready study and mark it PROCESSING with a new run row, atomically.

        Ready: QUEUED (an association that sent to it was released) with no new instance for
        settle_seconds, or RECEIVED with no new instance for quiet_seconds. The settle time is what keeps a
        PACS that sends each instance in its own association from making a study run once per instance.
        The claim and the run row are one transaction, so a study is never owned twice; the run row is the
        "processing record" a crash leaves behind, and ``recover`` turns it into "interrupted" on restart.
        """
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = c.execute(
                f"SELECT id, study_uid, state, revision FROM studies WHERE {_READY}"
                " ORDER BY state = 'queued' DESC, last_instance_at LIMIT 1",
                (now - settle_seconds, now - quiet_seconds),
            ).fetchone()
            if row is None:
                return None
            study_id, revision = int(row["id"]), int(row["revision"])
            state = next_state(StudyState(row["state"]), StudyEvent.CLAIM)
            c.execute(
                "UPDATE studies SET state = ?, updated_at = ? WHERE id = ?", (state.value, now, study_id)
            )
            instances = [
                InstanceRow(
                    sop_instance_uid=str(r["sop_instance_uid"]),
                    series_uid=str(r["series_uid"]),
                    sop_class_uid=str(r["sop_class_uid"]),
                    transfer_syntax=str(r["transfer_syntax"]),
                    modality=None if r["modality"] is None else str(r["modality"]),
                    path=Path(r["path"]),
                )
                for r in c.execute(
                    "SELECT sop_instance_uid, series_uid, sop_class_uid, transfer_syntax, modality, path"
                    " FROM instances WHERE study_id = ? ORDER BY series_uid, id",
                    (study_id,),
                ).fetchall()
            ]
            cur = c.execute(
                "INSERT INTO runs (study_id, revision, status, started_at, n_instances)"
                " VALUES (?, ?, 'processing', ?, ?)",
                (study_id, revision, now, len(instances)),
            )
            return Claim(int(cur.lastrowid or 0), study_id, str(row["study_uid"]), revision, instances)

    def next_quiet_deadline(self, quiet_seconds: float, *, settle_seconds: float = 0.0) -> float | None:
        """When the earliest waiting study becomes ready by quiet (or settle) time, epoch seconds, or None."""
        rows = self.db.query(
            "SELECT MIN(last_instance_at + CASE state WHEN 'queued' THEN ? ELSE ? END) AS t"
            " FROM studies WHERE state IN ('received', 'queued')",
            (settle_seconds, quiet_seconds),
        )
        t = rows[0]["t"]
        return None if t is None else float(t)

    def has_ready(
        self, quiet_seconds: float, now: float | None = None, *, settle_seconds: float = 0.0
    ) -> bool:
        now = time.time() if now is None else now
        rows = self.db.query(
            f"SELECT 1 FROM studies WHERE {_READY} LIMIT 1", (now - settle_seconds, now - quiet_seconds)
        )
        return bool(rows)

    def last_report(self, study_id: int) -> ReportRef | None:
        """The SR the latest finished run of this study produced, if any."""
        rows = self.db.query(
            "SELECT sr_uid, sr_series_uid FROM runs WHERE study_id = ? AND sr_uid IS NOT NULL"
            " ORDER BY id DESC LIMIT 1",
            (study_id,),
        )
        return ReportRef(str(rows[0]["sr_uid"]), str(rows[0]["sr_series_uid"])) if rows else None

    def finish(
        self,
        c: sqlite3.Connection,
        claim: Claim,
        status: StudyEvent,
        *,
        reason: str | None,
        findings: Sequence[FindingRow],
        model: ModelInUse | None,
        report: ReportRef | None = None,
        results_pending: bool = False,
        now: float | None = None,
    ) -> StudyState:
        """Record a run's outcome and findings inside the caller's transaction ``c``; return the new state.

        The caller adds the run's outbox entries in the same transaction (``results_pending`` says whether
        there were any), so a run's results exist exactly when its outcome does.
        """
        if status not in (StudyEvent.DONE, StudyEvent.SKIPPED, StudyEvent.FAILED):
            raise ValueError(f"a run finishes as done, skipped or failed, not {status.value}")
        now = time.time() if now is None else now
        c.execute(
            "UPDATE runs SET status = ?, finished_at = ?, reason = ?, model_id = ?, model_version = ?,"
            " provider = ?, sr_uid = ?, sr_series_uid = ? WHERE id = ? AND status = 'processing'",
            (
                status.value,
                now,
                reason,
                model.model_id if model else None,
                model.model_version if model else None,
                model.provider if model else None,
                report.sop_instance_uid if report else None,
                report.series_instance_uid if report else None,
                claim.run_id,
            ),
        )
        c.executemany(
            "INSERT INTO findings (run_id, sop_instance_uid, score, label) VALUES (?, ?, ?, ?)",
            [(claim.run_id, f.sop_instance_uid, f.score, f.label) for f in findings],
        )
        self._record_envelope(c, claim.run_id, findings, model)
        c.execute(
            "UPDATE instances SET state = 'processed' WHERE study_id = ? AND revision <= ?",
            (claim.study_id, claim.revision),
        )
        row = c.execute("SELECT state, revision FROM studies WHERE id = ?", (claim.study_id,)).fetchone()
        event = StudyEvent.STALE if int(row["revision"]) > claim.revision else status
        state = next_state(StudyState(row["state"]), event)
        c.execute(
            "UPDATE studies SET state = ?, updated_at = ?, results = CASE WHEN ? THEN 'pending' ELSE results"
            " END WHERE id = ?",
            (state.value, now, results_pending, claim.study_id),
        )
        return state

    @staticmethod
    def _record_envelope(
        c: sqlite3.Connection, run_id: int, findings: Sequence[FindingRow], model: ModelInUse | None
    ) -> None:
        """The findings' input envelope results, for the drift monitor and the page (envelope bundles)."""
        results = [f.envelope for f in findings if f.envelope is not None]
        if not results:
            return
        if model is None or model.envelope_quantile is None:
            raise ValueError("findings with input envelope results need the model's envelope quantile")
        record_envelope_results(
            c, run_id, model.model_id, model.model_version, model.envelope_quantile, results
        )

    def recover(self, max_attempts: int = 3) -> list[int]:
        """At start: runs left 'processing' by a crash become 'interrupted'; their studies are queued again.

        The run row is written in the claim's transaction, before any work, so it counts as an attempt even
        when the run kills the process (out of memory, a decoder crash). A study whose last
        ``max_attempts`` runs of the same revision were all interrupted is set aside as FAILED with that
        reason instead of being queued again: otherwise every restart would die on it once more. A new
        instance of the study (a new revision) gives it fresh attempts.

        Re-running is safe: the results of a run reach the outbox only in the transaction that finishes it,
        so an interrupted run sent nothing; and a re-run of the same revision builds the same result objects
        (same SOP Instance UIDs), so even a run whose outbox entries were sent twice (crash after the PACS
        stored them, before we marked them sent) stores the same objects again.
        Returns the interrupted run ids (their result directories are partial and get removed).
        """
        now = time.time()
        with self.db.tx() as c:
            runs = [
                int(r["id"]) for r in c.execute("SELECT id FROM runs WHERE status = 'processing'").fetchall()
            ]
            c.execute(
                "UPDATE runs SET status = 'interrupted', finished_at = ?,"
                " reason = 'node stopped during the run' WHERE status = 'processing'",
                (now,),
            )
            for row in c.execute("SELECT id, state FROM studies WHERE state = 'processing'").fetchall():
                attempts = self._interrupted_in_a_row(c, int(row["id"]))
                event = StudyEvent.GIVE_UP if attempts >= max_attempts else StudyEvent.RECOVER
                state = next_state(StudyState(row["state"]), event)
                c.execute(
                    "UPDATE studies SET state = ?, updated_at = ? WHERE id = ?", (state.value, now, row["id"])
                )
                if event is StudyEvent.GIVE_UP:
                    c.execute(
                        "UPDATE runs SET reason = ? WHERE id = (SELECT MAX(id) FROM runs WHERE study_id = ?)",
                        (
                            f"node stopped during {attempts} runs of this study in a row; set aside as failed"
                            " (a new instance of the study retries it)",
                            row["id"],
                        ),
                    )
        return runs

    @staticmethod
    def _interrupted_in_a_row(c: sqlite3.Connection, study_id: int) -> int:
        """How many of the study's latest runs, of its latest run's revision, were interrupted in a row."""
        rows = c.execute(
            "SELECT status, revision FROM runs WHERE study_id = ? ORDER BY id DESC", (study_id,)
        ).fetchall()
        count = 0
        for r in rows:
            if r["status"] != "interrupted" or int(r["revision"]) != int(rows[0]["revision"]):
                break
            count += 1
        return count


def settle_sent_results(c: sqlite3.Connection) -> None:
    """Inside the caller's transaction: studies with no pending outbox entry left have their results sent."""
    c.execute(
        "UPDATE studies SET results = 'sent' WHERE results = 'pending' AND id NOT IN"
        " (SELECT study_id FROM outbox WHERE state = 'pending')"
    )
