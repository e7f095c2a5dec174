"""The node's SQLite database: one connection, write transactions, reads, and the salt for UID hashes.

The tables are in ``schema``; each concern reads and writes its own through this object: ``ingest_records``
(studies and instances as they arrive), ``runs`` (claims, runs and findings), ``status_queries`` (what
``fedclinic-edge status`` shows), ``model_registry`` (installed models and the active one),
``envelope_monitor`` (each analysed image's input envelope result, written with its run) and
``edge_node.delivery.outbox`` (results waiting for their destinations).

Durability, and why ``synchronous`` is NORMAL for most writes and FULL for a few: SQLite runs in WAL mode.
With NORMAL a commit survives a crash of the process but a power cut may roll back the last commits; with
FULL every commit also fsyncs the log (one more disk flush, ~15 % of the ingest time measured here).

* Instances: the spooled *file* is the record of truth. The listener answers success only after the file is
  fsynced under a name that is already durable (a pool slot, see ``edge_node.ingest.spool``); if a power cut
  then loses the row (or the slot's rename into place), the spool's recovery finds the file without a row at
  the next start and indexes it again. So the row needs no fsync of its own.
* Run outcomes and the outbox: losing the last ones re-runs a study or re-sends a result, both idempotent
  (see ``runs.Runs.recover`` and ``edge_node.delivery.sender``).
* The model pointer and the node's salt: nothing else could rebuild them, so they commit with FULL.

One connection is shared by the listener's association threads, the worker and the sender, guarded by a
lock: SQLite serialises writers anyway, and every statement here is short (no file I/O under the lock).
Other processes (receiver processes, the CLI) open their own ``Database``. Their write transactions queue on
an flock of ``<database>.writers`` before they begin: a writer that finds another process's transaction
open then sleeps in the kernel and wakes the moment it ends, where SQLite's busy handler would poll it with
sleeps of 1, 2, 5, 10 ms and more (receivers commit an instance row each, hundreds a second).
``busy_timeout`` still bounds any wait that remains (a checkpoint, a process without the flock).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edge_node.state.schema import ADDED_COLUMNS, SCHEMA, SCHEMA_VERSION

__all__ = ["Database"]


class Database:
    """The SQLite file of one edge node (under data_dir), shared by every concern of its state."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._writers = os.open(f"{path}.writers", os.O_RDWR | os.O_CREAT, 0o600)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write transaction takes the write
        # lock up front and never fails half-way with SQLITE_BUSY on lock upgrade.
        self._conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self._conn.execute(statement)
        with self.tx(durable=True) as c:
            # Inside the write transaction: two processes opening an older database add each column once.
            for table, column, definition in ADDED_COLUMNS:
                present = {str(r["name"]) for r in c.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            c.execute(
                # The tables are created with IF NOT EXISTS above, so an older database gains the new
                # ones (and the columns just added); its recorded version then moves up (never down, should
                # an older node open it).
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE"
                " SET value = excluded.value WHERE CAST(value AS INTEGER) < CAST(excluded.value AS INTEGER)",
                (str(SCHEMA_VERSION),),
            )
            c.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('uid_salt', ?)", (secrets.token_hex(16),)
            )
        self._salt = self._meta("uid_salt")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            os.close(self._writers)

    @contextmanager
    def tx(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction under the database's lock; commits on success, rolls back on any exception.

        ``durable``: the commit fsyncs the log (synchronous=FULL), for what nothing could rebuild.
        """
        with self._lock:
            if durable:  # the safety level cannot change inside a transaction
                self._conn.execute("PRAGMA synchronous=FULL")
            fcntl.flock(self._writers, fcntl.LOCK_EX)  # other processes' writers queue here, not in SQLite
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                fcntl.flock(self._writers, fcntl.LOCK_UN)
                if durable:
                    self._conn.execute("PRAGMA synchronous=NORMAL")

    def query(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        """A read under the database's lock, outside any transaction (WAL: it sees the last commit)."""
        with self._lock:
            return list(self._conn.execute(sql, tuple(args)).fetchall())

    def _meta(self, key: str) -> str:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0]["value"])

    def uid_hash(self, uid: str, length: int = 10) -> str:
        """A short salted hash of a UID for logs, file names and status (UIDs can identify patients)."""
        return hashlib.sha256(f"{self._salt}:{uid}".encode()).hexdigest()[:length]
