"""The edge node's durable state in SQLite: instances, studies (a state machine), runs, findings, outbox.

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

import enum
import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TRANSITIONS",
    "Claim",
    "FindingRow",
    "InstanceRecord",
    "ModelRecord",
    "OutboxItem",
    "Store",
    "StudyEvent",
    "StudyState",
    "StudySummary",
    "format_transitions",
    "next_state",
]

SCHEMA_VERSION = 1


class StudyState(str, enum.Enum):
    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class StudyEvent(str, enum.Enum):
    INSTANCE = "instance"  # an instance of the study was spooled
    COMPLETE = "complete"  # the association that sent it was released
    CLAIM = "claim"  # the worker took it (queued, or received and quiet for quiet_seconds)
    DONE = "done"  # analysis finished with results
    SKIPPED = "skipped"  # analysis declined the study (wrong modality, ...) and said why
    FAILED = "failed"  # analysis raised
    STALE = "stale"  # a run finished but instances arrived while it ran: the study must run again
    RECOVER = "recover"  # the node restarted and found the study in processing


S, E = StudyState, StudyEvent

#: The study life cycle. Rule for late instances: an instance arriving after a study was processed sends it
#: back to RECEIVED, and the study is processed again *as a whole* (all its instances, old and new) once it
#: is complete again; the new run's results supersede the earlier ones. An instance arriving *during* a run
#: bumps the study's revision; the run still finishes and records its outcome, then the study goes back to
#: RECEIVED (STALE) instead of a final state.
TRANSITIONS: dict[tuple[StudyState, StudyEvent], StudyState] = {
    (S.RECEIVED, E.INSTANCE): S.RECEIVED,
    (S.RECEIVED, E.COMPLETE): S.QUEUED,
    (S.RECEIVED, E.CLAIM): S.PROCESSING,
    (S.QUEUED, E.INSTANCE): S.RECEIVED,
    (S.QUEUED, E.COMPLETE): S.QUEUED,
    (S.QUEUED, E.CLAIM): S.PROCESSING,
    (S.PROCESSING, E.INSTANCE): S.PROCESSING,
    (S.PROCESSING, E.COMPLETE): S.PROCESSING,
    (S.PROCESSING, E.DONE): S.DONE,
    (S.PROCESSING, E.SKIPPED): S.SKIPPED,
    (S.PROCESSING, E.FAILED): S.FAILED,
    (S.PROCESSING, E.STALE): S.RECEIVED,
    (S.PROCESSING, E.RECOVER): S.QUEUED,
    (S.DONE, E.INSTANCE): S.RECEIVED,
    (S.SKIPPED, E.INSTANCE): S.RECEIVED,
    (S.FAILED, E.INSTANCE): S.RECEIVED,
    (S.DONE, E.COMPLETE): S.DONE,
    (S.SKIPPED, E.COMPLETE): S.SKIPPED,
    (S.FAILED, E.COMPLETE): S.FAILED,
}


def next_state(state: StudyState, event: StudyEvent) -> StudyState:
    """The state after ``event``; a pair missing from TRANSITIONS is a bug and raises ValueError."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"study event {event.value!r} is not allowed in state {state.value!r}") from None


def format_transitions() -> str:
    """The transition table as aligned text (``fedclinic-edge states`` prints it)."""
    width = max(len(s.value) for s in StudyState)
    ev_width = max(len(e.value) for e in StudyEvent)
    return "\n".join(
        f"{src.value:<{width}} --{ev.value:-<{ev_width}}--> {dst.value}"
        for (src, ev), dst in TRANSITIONS.items()
    )


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
class OutboxItem:
    id: int
    run_id: int
    study_id: int
    path: Path
    dest_ae: str
    dest_host: str
    dest_port: int
    attempts: int


@dataclass(frozen=True)
class ModelRecord:
    row: int
    model_id: str
    version: str
    path: Path
    manifest_sha256: str
    key_fingerprint: str
    installed_at: float


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

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, tuple(args)).fetchall())

    def _meta(self, key: str) -> str:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
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
                    (rec.study_uid, S.RECEIVED.value, now, now, now),
                )
                study_id, revision = int(cur.lastrowid or 0), 1
            else:
                study_id, revision = int(row["id"]), int(row["revision"]) + 1
                state = next_state(StudyState(row["state"]), E.INSTANCE)
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
                after = next_state(before, E.COMPLETE)
                if after != before:
                    c.execute(
                        "UPDATE studies SET state = ?, updated_at = ? WHERE id = ?",
                        (after.value, now, study_id),
                    )
                    queued += 1
        return queued

    def spool_paths(self) -> set[Path]:
        return {Path(r["path"]) for r in self._query("SELECT path FROM instances")}

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
            state = next_state(StudyState(row["state"]), E.CLAIM)
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
        rows = self._query("SELECT MIN(last_instance_at) AS t FROM studies WHERE state = 'received'")
        t = rows[0]["t"]
        return None if t is None else float(t) + quiet_seconds

    def has_ready(self, quiet_seconds: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        rows = self._query(
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
        if status not in (E.DONE, E.SKIPPED, E.FAILED):
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
            rows = [
                (claim.run_id, claim.study_id, str(p), ae, host, port, now, now)
                for p in outputs
                for (ae, host, port) in destinations
            ]
            c.executemany(
                "INSERT INTO outbox (run_id, study_id, path, dest_ae, dest_host, dest_port, next_try,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            c.execute(
                "UPDATE instances SET state = 'processed' WHERE study_id = ? AND revision <= ?",
                (claim.study_id, claim.revision),
            )
            row = c.execute("SELECT state, revision FROM studies WHERE id = ?", (claim.study_id,)).fetchone()
            event = E.STALE if int(row["revision"]) > claim.revision else status
            state = next_state(StudyState(row["state"]), event)
            results = "pending" if rows else None
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
                state = next_state(StudyState(row["state"]), E.RECOVER)
                c.execute(
                    "UPDATE studies SET state = ?, updated_at = ? WHERE id = ?", (state.value, now, row["id"])
                )
        return runs

    # -- outbox ----------------------------------------------------------------------------------------------

    def due_outbox(self, now: float | None = None, limit: int = 200) -> list[OutboxItem]:
        now = time.time() if now is None else now
        rows = self._query(
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

    def next_outbox_try(self) -> float | None:
        rows = self._query("SELECT MIN(next_try) AS t FROM outbox WHERE state = 'pending'")
        t = rows[0]["t"]
        return None if t is None else float(t)

    def mark_sent(self, ids: Sequence[int], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.tx() as c:
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
        with self.tx() as c:
            c.executemany(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_try = ? WHERE id = ?",
                [(error, t, i) for i, t in zip(ids, next_try, strict=True)],
            )

    # -- models ----------------------------------------------------------------------------------------------

    def model_by_id(self, model_id: str, version: str) -> ModelRecord | None:
        rows = self._query("SELECT * FROM models WHERE model_id = ? AND version = ?", (model_id, version))
        return _model(rows[0]) if rows else None

    def add_model(
        self, model_id: str, version: str, path: Path, manifest_sha256: str, fingerprint: str
    ) -> int:
        with self.tx(durable=True) as c:
            cur = c.execute(
                "INSERT INTO models (model_id, version, path, manifest_sha256, key_fingerprint, installed_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (model_id, version, str(path), manifest_sha256, fingerprint, time.time()),
            )
            return int(cur.lastrowid or 0)

    def activate(self, model_row: int, reason: str) -> None:
        """The atomic switch: the active model is the latest activation row (one INSERT, one commit)."""
        with self.tx(durable=True) as c:
            c.execute(
                "INSERT INTO activations (model_row, at, reason) VALUES (?, ?, ?)",
                (model_row, time.time(), reason),
            )

    def active_model(self) -> ModelRecord | None:
        rows = self._query(
            "SELECT m.* FROM activations a JOIN models m ON m.id = a.model_row ORDER BY a.id DESC LIMIT 1"
        )
        return _model(rows[0]) if rows else None

    def activation_id(self) -> int:
        """Increases with every switch; the worker compares it to notice a new active model cheaply."""
        rows = self._query("SELECT COALESCE(MAX(id), 0) AS n FROM activations")
        return int(rows[0]["n"])

    def previous_model(self) -> ModelRecord | None:
        """The model that was active just before the current activation (what rollback goes back to)."""
        rows = self._query(
            "SELECT m.* FROM activations a JOIN models m ON m.id = a.model_row"
            " WHERE a.id < (SELECT MAX(id) FROM activations)"
            " AND a.model_row != (SELECT model_row FROM activations ORDER BY id DESC LIMIT 1)"
            " ORDER BY a.id DESC LIMIT 1"
        )
        return _model(rows[0]) if rows else None

    # -- status ----------------------------------------------------------------------------------------------

    def recent_studies(self, limit: int = 20) -> list[StudySummary]:
        rows = self._query(
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
        for r in self._query("SELECT state, COUNT(*) AS n FROM studies GROUP BY state"):
            out[str(r["state"])] = int(r["n"])
        out["instances"] = int(self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
        out["outbox_pending"] = int(
            self._query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'pending'")[0]["n"]
        )
        out["outbox_sent"] = int(self._query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'sent'")[0]["n"])
        return out

    def last_send_error(self) -> str | None:
        rows = self._query(
            "SELECT last_error FROM outbox WHERE state = 'pending' AND last_error IS NOT NULL"
            " ORDER BY id DESC LIMIT 1"
        )
        return str(rows[0]["last_error"]) if rows else None


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
