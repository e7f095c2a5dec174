"""The edge node's durable state in SQLite: connection, schema, instances, studies, runs and findings.

The study life cycle these rows follow is in ``study``; the outbox and the model registry share this
connection and live in ``outbox`` and ``registry`` (reached as ``Store.outbox`` and ``Store.models``).

Durability, and why ``synchronous`` is NORMAL for most writes and FULL for a few: SQLite runs in WAL mode.
With NORMAL a commit survives a crash of the process but a power cut may roll back the last commits; with
FULL every commit also fsyncs the log (one more disk flush, ~15 % of the ingest time measured here).

* Instances: the spooled *file* is the record of truth. The listener answers success only after the file is
  fsynced under a name that is already durable (a pool slot, see ``Spool``); if a power cut then loses the
  row (or the slot's rename into place), ``Spool.recover`` finds the file without a row at the next start
  and indexes it again. So the row needs no fsync of its own.
* Run outcomes and the outbox: losing the last ones re-runs a study or re-sends a result, both idempotent
  (see ``recover`` and ``worker.Sender``).
* The model pointer and the node's salt: nothing else could rebuild them, so they commit with FULL.

One connection is shared by the listener's association threads, the worker and the sender, guarded by a
lock: SQLite serialises writers anyway, and every statement here is short (no file I/O under the lock).
Other processes (the CLI) open their own ``Store``; ``busy_timeout`` makes them wait instead of failing.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_node.outbox import Outbox, enqueue
from edge_node.registry import ModelRegistry
from edge_node.study import StudyEvent, StudyState, next_state

__all__ = ["Claim", "FindingRow", "InstanceRecord", "Store", "StudySummary"]

SCHEMA_VERSION = 1


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL,
    first_received_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    results TEXT NOT NULL DEFAULT 'none'
);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state, last_instance_at);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id),
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    modality TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'spooled'
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_id);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id),
    revision INTEGER NOT NULL,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    n_instances INTEGER NOT NULL,
    model_id TEXT,
    model_version TEXT,
    provider TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_study ON runs (study_id);
CREATE TABLE IF NOT EXISTS findings (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    sop_instance_uid TEXT NOT NULL,
    score REAL NOT NULL,
    label TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS findings_by_run ON findings (run_id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs (id),
    study_id INTEGER NOT NULL REFERENCES studies (id),
    path TEXT NOT NULL,
    dest_ae TEXT NOT NULL,
    dest_host TEXT NOT NULL,
    dest_port INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_try);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    model_id TEXT NOT NULL,
    version TEXT NOT NULL,
    path TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    installed_at REAL NOT NULL,
    UNIQUE (model_id, version)
);
CREATE TABLE IF NOT EXISTS activations (
    id INTEGER PRIMARY KEY,
    model_row INTEGER NOT NULL REFERENCES models (id),
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class InstanceRecord:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str | None
    path: Path
    size: int
    calling_ae: str


@dataclass(frozen=True)
class Claim:
    """A study the worker owns until it finishes the run."""

    run_id: int
    study_id: int
    study_uid: str
    revision: int
    instances: list[Path]


@dataclass(frozen=True)
class FindingRow:
    sop_instance_uid: str
    score: float
    label: str


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    state: str
    results: str
    n_instances: int
    last_instance_at: float
    runs: int
    model: str | None
    top_score: float | None
    top_label: str | None
    reason: str | None


class Store:
    """SQLite-backed state of one edge node (one file under data_dir)."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write transaction takes the write
        # lock up front and never fails half-way with SQLITE_BUSY on lock upgrade.
        self._conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._conn.execute(statement)
        with self.tx(durable=True) as c:
            c.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            c.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('uid_salt', ?)", (secrets.token_hex(16),)
            )
        self._salt = self._meta("uid_salt")
        self.outbox = Outbox(self)
        self.models = ModelRegistry(self)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction under the store's lock; commits on success, rolls back on any exception.

        ``durable``: the commit fsyncs the log (synchronous=FULL), for what nothing could rebuild.
        """
        with self._lock:
            if durable:  # the safety level cannot change inside a transaction
                self._conn.execute("PRAGMA synchronous=FULL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                if durable:
                    self._conn.execute("PRAGMA synchronous=NORMAL")

    def query(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        """A read under the store's lock, outside any transaction (WAL: it sees the last commit)."""
        with self._lock:
            return list(self._conn.execute(sql, tuple(args)).fetchall())

    def _meta(self, key: str) -> str:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0]["value"])

    # -- identifiers -----------------------------------------------------------------------------------------

    def uid_hash(self, uid: str, length: int = 10) -> str:
        """A short salted hash of a UID for logs, file names and status (UIDs can identify patients)."""
        return hashlib.sha256(f"{self._salt}:{uid}".encode()).hexdigest()[:length]

    # -- ingest ----------------------------------------------------------------------------------------------

    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> tuple[int, Path | None]:
        """Record a spooled instance; returns (study row id, a superseded spool file to delete, if any)."""
        now = time.time() if now is None else now
        with self.tx() as c:
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
        with self.tx() as c:
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

    def spool_paths(self) -> set[Path]:
        return {Path(r["path"]) for r in self.query("SELECT path FROM instances")}

    # -- worker ----------------------------------------------------------------------------------------------

    def claim_next(self, quiet_seconds: float, now: float | None = None) -> Claim | None:
        """Take the next ready study and mark it PROCESSING with a new run row, atomically.

        Ready: QUEUED (its association was released), or RECEIVED with no new instance for quiet_seconds.
        The claim and the run row are one transaction, so a study is never owned twice; the run row is the
        "processing record" a crash leaves behind, and ``recover`` turns it into "interrupted" on restart.
        """
        now = time.time() if now is None else now
        with self.tx() as c:
            row = c.execute(
                "SELECT id, study_uid, state, revision FROM studies"
                " WHERE state = 'queued' OR (state = 'received' AND last_instance_at <= ?)"
                " ORDER BY state = 'queued' DESC, last_instance_at LIMIT 1",
                (now - quiet_seconds,),
            ).fetchone()
            if row is None:
                return None
            study_id, revision = int(row["id"]), int(row["revision"])
            state = next_state(StudyState(row["state"]), StudyEvent.CLAIM)
            c.execute(
                "UPDATE studies SET state = ?, updated_at = ? WHERE id = ?", (state.value, now, study_id)
            )
            paths = [
                Path(r["path"])
                for r in c.execute(
                    "SELECT path FROM instances WHERE study_id = ? ORDER BY series_uid, id", (study_id,)
                ).fetchall()
            ]
            cur = c.execute(
                "INSERT INTO runs (study_id, revision, status, started_at, n_instances)"
                " VALUES (?, ?, 'processing', ?, ?)",
                (study_id, revision, now, len(paths)),
            )
            return Claim(int(cur.lastrowid or 0), study_id, str(row["study_uid"]), revision, paths)

    def next_quiet_deadline(self, quiet_seconds: float) -> float | None:
        """When the earliest RECEIVED study becomes ready by quiet time (epoch seconds), or None."""
        rows = self.query("SELECT MIN(last_instance_at) AS t FROM studies WHERE state = 'received'")
        t = rows[0]["t"]
        return None if t is None else float(t) + quiet_seconds

    def has_ready(self, quiet_seconds: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        rows = self.query(
            "SELECT 1 FROM studies"
            " WHERE state = 'queued' OR (state = 'received' AND last_instance_at <= ?) LIMIT 1",
            (now - quiet_seconds,),
        )
        return bool(rows)

    def finish_run(
        self,
        claim: Claim,
        status: StudyEvent,
        *,
        reason: str | None,
        findings: Sequence[FindingRow],
        outputs: Sequence[Path],
        destinations: Sequence[tuple[str, str, int]],
        model: tuple[str, str, str] | None,
        now: float | None = None,
    ) -> StudyState:
        """Record a run's outcome, findings and outbox entries in one transaction; return the new state."""
        if status not in (StudyEvent.DONE, StudyEvent.SKIPPED, StudyEvent.FAILED):
            raise ValueError(f"a run finishes as done, skipped or failed, not {status.value}")
        now = time.time() if now is None else now
        model_id, model_version, provider = model if model is not None else (None, None, None)
        with self.tx() as c:
            c.execute(
                "UPDATE runs SET status = ?, finished_at = ?, reason = ?, model_id = ?, model_version = ?,"
                " provider = ? WHERE id = ? AND status = 'processing'",
                (status.value, now, reason, model_id, model_version, provider, claim.run_id),
            )
            c.executemany(
                "INSERT INTO findings (run_id, sop_instance_uid, score, label) VALUES (?, ?, ?, ?)",
                [(claim.run_id, f.sop_instance_uid, f.score, f.label) for f in findings],
            )
            queued = enqueue(c, claim.run_id, claim.study_id, outputs, destinations, now)
            c.execute(
                "UPDATE instances SET state = 'processed' WHERE study_id = ? AND revision <= ?",
                (claim.study_id, claim.revision),
            )
            row = c.execute("SELECT state, revision FROM studies WHERE id = ?", (claim.study_id,)).fetchone()
            event = StudyEvent.STALE if int(row["revision"]) > claim.revision else status
            state = next_state(StudyState(row["state"]), event)
            results = "pending" if queued else None
            c.execute(
                "UPDATE studies SET state = ?, updated_at = ?, results = COALESCE(?, results) WHERE id = ?",
                (state.value, now, results, claim.study_id),
            )
        return state

    def recover(self) -> list[int]:
        """At start: runs left 'processing' by a crash become 'interrupted'; their studies are queued again.

        Re-running is safe: the results of a run reach the outbox only in the transaction that finishes it,
        so an interrupted run sent nothing; and result SOP Instance UIDs are derived from the source, so even
        a run whose outbox entries were sent twice (crash after the PACS stored them, before we marked them
        sent) stores the same objects again, which the PACS treats as the same instances.
        Returns the interrupted run ids (their result directories are partial and get removed).
        """
        now = time.time()
        with self.tx() as c:
            runs = [
                int(r["id"]) for r in c.execute("SELECT id FROM runs WHERE status = 'processing'").fetchall()
            ]
            c.execute(
                "UPDATE runs SET status = 'interrupted', finished_at = ?,"
                " reason = 'node stopped during the run' WHERE status = 'processing'",
                (now,),
            )
            for row in c.execute("SELECT id, state FROM studies WHERE state = 'processing'").fetchall():
                state = next_state(StudyState(row["state"]), StudyEvent.RECOVER)
                c.execute(
                    "UPDATE studies SET state = ?, updated_at = ? WHERE id = ?", (state.value, now, row["id"])
                )
        return runs

    # -- status ----------------------------------------------------------------------------------------------

    def recent_studies(self, limit: int = 20) -> list[StudySummary]:
        rows = self.query(
            """
            SELECT s.study_uid, s.state, s.results, s.last_instance_at,
                   (SELECT COUNT(*) FROM instances i WHERE i.study_id = s.id) AS n_instances,
                   (SELECT COUNT(*) FROM runs r
                     WHERE r.study_id = s.id AND r.status != 'interrupted') AS n_runs,
                   lr.model_id, lr.model_version, lr.reason,
                   (SELECT MAX(score) FROM findings f WHERE f.run_id = lr.id) AS top_score,
                   (SELECT label FROM findings f
                     WHERE f.run_id = lr.id ORDER BY score DESC LIMIT 1) AS top_label
            FROM studies s
            LEFT JOIN runs lr ON lr.id = (SELECT MAX(id) FROM runs r WHERE r.study_id = s.id)
            ORDER BY s.last_instance_at DESC LIMIT ?
            """,
            (limit,),
        )
        return [
            StudySummary(
                study_uid=str(r["study_uid"]),
                state=str(r["state"]),
                results=str(r["results"]),
                n_instances=int(r["n_instances"]),
                last_instance_at=float(r["last_instance_at"]),
                runs=int(r["n_runs"]),
                model=f"{r['model_id']} {r['model_version']}" if r["model_id"] else None,
                top_score=None if r["top_score"] is None else float(r["top_score"]),
                top_label=None if r["top_label"] is None else str(r["top_label"]),
                reason=None if r["reason"] is None else str(r["reason"]),
            )
            for r in rows
        ]

    def counts(self) -> dict[str, int]:
        """Studies per state plus instances and pending outbox entries (for status and tests)."""
        out = {s.value: 0 for s in StudyState}
        for r in self.query("SELECT state, COUNT(*) AS n FROM studies GROUP BY state"):
            out[str(r["state"])] = int(r["n"])
        out["instances"] = int(self.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
        out["outbox_pending"] = int(
            self.query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'pending'")[0]["n"]
        )
        out["outbox_sent"] = int(self.query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'sent'")[0]["n"])
        return out
