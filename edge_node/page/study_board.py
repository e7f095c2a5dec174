"""What the page lists: the recent studies with the model's finding, its score and the label in force, and
how many of the analysed images lay outside the model's input envelope (bundles with one)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from edge_node.state.database import Database

__all__ = ["BoardStudy", "recent_board", "study_uid_of"]


@dataclass(frozen=True)
class BoardStudy:
    """One study as the page shows it; ``key`` (the row id) names it in thumbnail URLs."""

    key: int
    study_instance_uid: str
    received_at: str
    state: str
    finding: str | None
    score: float | None
    model: str | None
    label: str | None
    labeled_by: str | None
    #: Of the latest run's images: how many had an input envelope result and how many lay outside; None
    #: when the run's model has no envelope (or no run finished).
    envelope_images: int | None = None
    outside_envelope: int | None = None
    #: Of those, how many looked like negatives of the validation images; None without an intensity part.
    negative_images: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "study_instance_uid": self.study_instance_uid,
            "received_at": self.received_at,
            "state": self.state,
            "finding": self.finding,
            "score": self.score,
            "model": self.model,
            "label": self.label,
            "labeled_by": self.labeled_by,
            "envelope_images": self.envelope_images,
            "outside_envelope": self.outside_envelope,
            "negative_images": self.negative_images,
            "thumbnail": f"/thumbnails/{self.key}.png",
        }


def recent_board(db: Database, limit: int = 50) -> list[BoardStudy]:
    """The latest ``limit`` studies, newest first; the finding is the latest run's highest-scored one."""
    rows = db.query(
        """
        SELECT s.id, s.study_uid, s.state, s.last_instance_at, lr.model_id, lr.model_version,
               (SELECT f.score FROM findings f WHERE f.run_id = lr.id
                 ORDER BY f.score DESC LIMIT 1) AS score,
               (SELECT f.label FROM findings f WHERE f.run_id = lr.id
                 ORDER BY f.score DESC LIMIT 1) AS finding,
               (SELECT COUNT(*) FROM envelope_results e WHERE e.run_id = lr.id) AS envelope_images,
               (SELECT SUM(e.outside) FROM envelope_results e WHERE e.run_id = lr.id) AS outside_envelope,
               (SELECT SUM(e.negative) FROM envelope_results e WHERE e.run_id = lr.id) AS negative_images,
               l.label, l.source, l.who
        FROM studies s
        LEFT JOIN runs lr ON lr.id =
            (SELECT MAX(id) FROM runs r WHERE r.study_id = s.id AND r.status = 'done')
        LEFT JOIN labels l ON l.scope = 'study' AND l.uid = s.study_uid
        ORDER BY s.last_instance_at DESC, s.id DESC LIMIT ?
        """,
        (limit,),
    )
    return [
        BoardStudy(
            key=int(r["id"]),
            study_instance_uid=str(r["study_uid"]),
            received_at=datetime.fromtimestamp(float(r["last_instance_at"]), timezone.utc).isoformat(
                timespec="seconds"
            ),
            state=str(r["state"]),
            finding=None if r["finding"] is None else str(r["finding"]),
            score=None if r["score"] is None else float(r["score"]),
            model=f"{r['model_id']} {r['model_version']}" if r["model_id"] else None,
            label=None if r["label"] is None else str(r["label"]),
            labeled_by=None if r["label"] is None else f"{r['who']} ({r['source']})",
            envelope_images=int(r["envelope_images"]) if r["outside_envelope"] is not None else None,
            outside_envelope=None if r["outside_envelope"] is None else int(r["outside_envelope"]),
            negative_images=None if r["negative_images"] is None else int(r["negative_images"]),
        )
        for r in rows
    ]


def study_uid_of(db: Database, key: int) -> str | None:
    rows = db.query("SELECT study_uid FROM studies WHERE id = ?", (key,))
    return str(rows[0]["study_uid"]) if rows else None
