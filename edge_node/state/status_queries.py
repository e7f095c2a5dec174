"""Status queries: totals and recent studies as ``fedclinic-edge status`` shows them (reads only)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_node.state.database import Database
from edge_node.state.lifecycle import StudyState

__all__ = ["StatusQueries", "StudySummary"]


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


class StatusQueries:
    """What the node has received, analysed and sent, read from its database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def recent_studies(self, limit: int = 20) -> list[StudySummary]:
        rows = self.db.query(
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
        for r in self.db.query("SELECT state, COUNT(*) AS n FROM studies GROUP BY state"):
            out[str(r["state"])] = int(r["n"])
        out["instances"] = int(self.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
        out["outbox_pending"] = int(
            self.db.query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'pending'")[0]["n"]
        )
        out["outbox_sent"] = int(
            self.db.query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'sent'")[0]["n"]
        )
        return out

    def last_send_error(self) -> str | None:
        """The latest error of a result still waiting to be sent, or None."""
        rows = self.db.query(
            "SELECT last_error FROM outbox WHERE state = 'pending' AND last_error IS NOT NULL"
            " ORDER BY id DESC LIMIT 1"
        )
        return str(rows[0]["last_error"]) if rows else None
