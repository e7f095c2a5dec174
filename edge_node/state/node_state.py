"""The state of one node opened as a whole: its database and the object for each concern over it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_node.state.database import Database
from edge_node.state.envelope_monitor import EnvelopeMonitor
from edge_node.state.ingest_records import IngestRecords
from edge_node.state.model_registry import ModelRegistry
from edge_node.state.runs import Runs
from edge_node.state.status_queries import StatusQueries

__all__ = ["NodeState"]


@dataclass(frozen=True)
class NodeState:
    """One database, read and written by concern: ingest, runs, status, models, the envelope monitor."""

    db: Database
    ingest: IngestRecords
    runs: Runs
    status: StatusQueries
    models: ModelRegistry
    envelope: EnvelopeMonitor

    @classmethod
    def open(cls, path: Path) -> NodeState:
        db = Database(path)
        return cls(db, IngestRecords(db), Runs(db), StatusQueries(db), ModelRegistry(db), EnvelopeMonitor(db))

    def close(self) -> None:
        self.db.close()
