"""What left the clinic: each outbox update beside its privacy-ledger row, for people and tools.

Bytes are measured from the stored npz payload (what the hub receives, before base64), never estimated. An
update is charged to the ledger before it enters the outbox, so every row here has its privacy spent; a row
without one predates the ledger and says so.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_node.protection.floor import PrivacyFloor
from edge_node.protection.ledger import LEDGER_FILE, LedgerEntry, PrivacyLedger

__all__ = ["OutgoingUpdate", "UpdateLog"]


@dataclass(frozen=True)
class OutgoingUpdate:
    """One answer to a hub task: where it went, how big it was, what it cost in privacy."""

    task_id: str
    round: int
    kind: str
    payload_bytes: int
    #: pending (waiting for the hub), sent (the hub has it), refused (the hub will never take it)
    state: str
    queued_at: str
    sent_at: str | None
    hub_url: str | None
    epsilon: float | None  # this update's own ε at ``delta``; None with noise_multiplier None: no noise
    delta: float | None
    noise_multiplier: float | None
    charged: bool  # False: no ledger row (an update queued before the ledger existed)
    last_error: str | None

    def privacy_words(self) -> str:
        if not self.charged:
            return "not recorded"
        if self.noise_multiplier is None:
            return "no noise (unbounded)"
        return f"ε {self.epsilon:.3g}, δ {self.delta:g}" if self.epsilon is not None else "noised"


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class UpdateLog:
    """The updates of one node with its total privacy spent (read-only view of outbox and ledger)."""

    updates: list[OutgoingUpdate]
    spent_epsilon: float  # inf once an update without noise left
    delta: float
    budget: float | None
    summary: str

    @classmethod
    def read(cls, data_dir: Path, floor: PrivacyFloor, hub_url: str | None) -> UpdateLog:
        ledger_path = data_dir / LEDGER_FILE
        entries: dict[str, LedgerEntry] = {}
        spent, summary = 0.0, "No update has left this clinic yet; no privacy has been spent."
        if ledger_path.is_file():
            ledger = PrivacyLedger(ledger_path, delta=floor.delta)
            entries = {e.task_id: e for e in ledger.entries()}
            spent = ledger.spent()
            summary = ledger.report(floor.max_epsilon_total)
        updates = [
            cls._row(row, entries.get(str(row[0])), hub_url) for row in _outbox_rows(data_dir / "uplink")
        ]
        return cls(updates, spent, floor.delta, floor.max_epsilon_total, summary)

    @staticmethod
    def _row(row: tuple[Any, ...], entry: LedgerEntry | None, hub_url: str | None) -> OutgoingUpdate:
        task_id, envelope, size, state, created, done, error = row
        meta = json.loads(envelope)
        return OutgoingUpdate(
            task_id=str(task_id),
            round=int(meta["round"]),
            kind=str(meta["kind"]),
            payload_bytes=int(size),
            state=str(state),
            queued_at=_iso(created) or "",
            sent_at=_iso(done) if state == "sent" else None,
            hub_url=hub_url,
            epsilon=entry.epsilon if entry else None,
            delta=entry.delta if entry else None,
            noise_multiplier=entry.noise_multiplier if entry else None,
            charged=entry is not None,
            last_error=error,
        )

    def to_json(self) -> dict[str, Any]:
        """``fedclinic-edge updates --format json`` (keys are only ever added)."""
        finite = not math.isinf(self.spent_epsilon)
        return {
            "privacy": {
                "spent_epsilon": self.spent_epsilon if finite else None,
                "unbounded": not finite,
                "delta": self.delta,
                "budget_epsilon": self.budget,
                "summary": self.summary,
            },
            "updates": [asdict(u) for u in self.updates],
        }


def _outbox_rows(directory: Path) -> list[tuple[Any, ...]]:
    """The outbox's rows, oldest first, read without creating or changing anything."""
    path = directory / "outbox.sqlite3"
    if not path.is_file():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        return list(
            db.execute(
                "SELECT task_id, envelope, length(payload), state, created_at, done_at, last_error"
                " FROM updates ORDER BY id"
            )
        )
    finally:
        db.close()
