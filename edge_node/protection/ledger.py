"""The clinic's privacy ledger: every update that left, and the budget it spent, in its own SQLite file.

A release is charged *before* its update enters the outbox, so a crash after charging can only overstate
what was spent, never understate it; a task charged twice (a retry) is charged once. The total is the
composition of all releases by the shared accountant at the clinic's δ, so it is tighter than a sum of
per-round ε. An update sent without noise has no finite ε: once one has left, the total is infinite.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge_node.protection.errors import LedgerError, TaskRefused
from edge_node.protocol.accountant import GaussianRelease, PrivacyAccountant

__all__ = ["LEDGER_FILE", "LedgerEntry", "PrivacyLedger"]

logger = logging.getLogger(__name__)

#: The ledger's file name under the node's data directory.
LEDGER_FILE = "privacy-ledger.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    task_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,
    noise_multiplier REAL,
    sampling_rate REAL NOT NULL,
    epsilon REAL,
    delta REAL NOT NULL,
    payload_bytes INTEGER NOT NULL,
    sent_at TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class LedgerEntry:
    """One update that left the clinic: its task, what it cost in privacy and in bytes."""

    task_id: str
    round: int
    kind: str
    noise_multiplier: float | None  # None: sent without noise
    sampling_rate: float
    epsilon: float | None  # the round's own ε at ``delta``; None: unbounded
    delta: float
    payload_bytes: int
    sent_at: str

    def release(self) -> GaussianRelease | None:
        """The accountant's view of this entry (None when it carried no noise)."""
        if self.noise_multiplier is None:
            return None
        return GaussianRelease(self.noise_multiplier, 1, self.sampling_rate)


class PrivacyLedger:
    """Persistent record of released updates with the total (ε, ``delta``) spent; refuses overspending."""

    def __init__(self, path: Path, *, delta: float) -> None:
        self.path = path
        self.delta = delta
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot open the privacy ledger at {path}: {exc}") from exc

    @classmethod
    def in_data_dir(cls, data_dir: Path, *, delta: float) -> PrivacyLedger:
        """The ledger kept under the node's data directory."""
        return cls(data_dir / LEDGER_FILE, delta=delta)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a charge survives a power cut
            yield db
        finally:
            db.close()

    def entries(self) -> list[LedgerEntry]:
        """Every release, oldest first."""
        try:
            with self._connect() as db:
                rows = db.execute(_SELECT_ALL).fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read the privacy ledger at {self.path}: {exc}") from exc
        return [LedgerEntry(*row) for row in rows]

    def spent(self) -> float:
        """Total ε at this ledger's δ of everything that left (inf once an unnoised update left)."""
        return self._total(self.entries(), None)

    def report(self, max_total: float | None = None) -> str:
        """What left the clinic and the privacy spent, in plain words (for ``fedclinic-edge updates``)."""
        entries = self.entries()
        if not entries:
            return "No update has left this clinic yet; no privacy has been spent."
        sent = sum(e.payload_bytes for e in entries)
        unnoised = sum(1 for e in entries if e.noise_multiplier is None)
        words = [
            f"{len(entries)} update{'s' if len(entries) != 1 else ''} left this clinic "
            f"({sent:,} bytes in all), the last in round {entries[-1].round}."
        ]
        spent = self._total(entries, None)
        if math.isinf(spent):
            words.append(
                f"{unnoised} of them carried no noise, so the privacy spent has no finite bound "
                "(differential privacy does not cover them)."
            )
        else:
            words.append(f"Privacy spent: epsilon {spent:.3g} at delta {self.delta:g}.")
        if max_total is not None and not math.isinf(spent):
            words.append(
                f"The clinic's budget is epsilon {max_total:g}; {max(0.0, max_total - spent):.3g} is left."
            )
        return " ".join(words)

    def would_spend(self, noise_multiplier: float | None, sampling_rate: float = 1.0) -> float:
        """Total ε if one more release of this kind left now."""
        return self._total(self.entries(), (noise_multiplier, sampling_rate))

    def _total(self, entries: list[LedgerEntry], extra: tuple[float | None, float] | None) -> float:
        releases: list[GaussianRelease] = []
        for e in entries:
            r = e.release()
            if r is None:
                return math.inf
            releases.append(r)
        if extra is not None:
            if extra[0] is None:
                return math.inf
            releases.append(GaussianRelease(extra[0], 1, extra[1]))
        return PrivacyAccountant(releases).epsilon(self.delta)

    def charge(
        self,
        task_id: str,
        *,
        round: int,
        kind: str,
        noise_multiplier: float | None,
        sampling_rate: float = 1.0,
        epsilon: float | None,
        delta: float,
        payload_bytes: int,
        max_total: float | None,
    ) -> LedgerEntry:
        """Record this release unless it would take the total past ``max_total`` (then TaskRefused).

        Check and insert are one transaction, so two workers cannot both spend the last of the budget. A
        task already charged returns its entry unchanged.
        """
        try:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    existing = self._entry(db, task_id)
                    if existing is not None:
                        db.execute("COMMIT")
                        return existing
                    entries = [LedgerEntry(*row) for row in db.execute(_SELECT_ALL).fetchall()]
                    if max_total is not None:
                        total = self._total(entries, (noise_multiplier, sampling_rate))
                        if total > max_total:
                            db.execute("ROLLBACK")
                            spent = self._total(entries, None)
                            raise TaskRefused(
                                f"this update would bring the clinic's privacy spent to epsilon "
                                f"{total:.3g} (delta {self.delta:g}), over its budget of {max_total:g}; "
                                f"spent so far {spent:.3g}"
                            )
                    entry = LedgerEntry(
                        task_id,
                        round,
                        kind,
                        noise_multiplier,
                        sampling_rate,
                        epsilon,
                        delta,
                        payload_bytes,
                        datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                    )
                    db.execute(
                        "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            entry.task_id,
                            entry.round,
                            entry.kind,
                            entry.noise_multiplier,
                            entry.sampling_rate,
                            entry.epsilon,
                            entry.delta,
                            entry.payload_bytes,
                            entry.sent_at,
                        ),
                    )
                    db.execute("COMMIT")
                except sqlite3.Error:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot write the privacy ledger at {self.path}: {exc}") from exc
        logger.info("privacy ledger: charged round %d (%s, %d bytes)", round, kind, payload_bytes)
        return entry

    @staticmethod
    def _entry(db: sqlite3.Connection, task_id: str) -> LedgerEntry | None:
        row = db.execute(_SELECT_ALL.replace("ORDER BY", "WHERE task_id = ? ORDER BY"), (task_id,)).fetchone()
        return LedgerEntry(*row) if row else None


_SELECT_ALL = (
    "SELECT task_id, round, kind, noise_multiplier, sampling_rate, epsilon, delta, payload_bytes, sent_at "
    "FROM releases ORDER BY sent_at, rowid"
)
