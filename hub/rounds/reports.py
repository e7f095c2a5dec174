"""RoundReports: rounds as the operator and the dashboard read them (RoundInfo, results, activity)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import RoundInfo, RoundState, TaskRefusalInfo, TaskState
from hub.fl.strategy import Params
from hub.rounds.ledger import accepted_count
from hub.rounds.task_desk import round_protection
from hub.service.errors import NotFoundError
from hub.store.artifacts import load_tensors
from hub.store.database import Database
from hub.store.schema import Round, Task

__all__ = ["RoundReports", "round_row"]


def round_row(session: Session, round_ref: str) -> Round:
    """The round with this id, or this number."""
    row = session.get(Round, round_ref)
    if row is None and round_ref.isdigit():
        row = session.scalars(select(Round).where(Round.number == int(round_ref))).one_or_none()
    if row is None:
        raise NotFoundError(f"no round {round_ref!r}; see `fedclinic-hub rounds list`")
    return row


class RoundReports:
    def __init__(self, db: Database) -> None:
        self.db = db

    def _info(self, session: Session, row: Round) -> RoundInfo:
        missing = int(
            session.scalar(
                select(func.count(Task.id)).where(
                    Task.round_id == row.id,
                    Task.state.in_([TaskState.CLOSED.value, TaskState.REFUSED.value]),
                )
            )
            or 0
        )
        refusals = [
            TaskRefusalInfo(node_id=t.node_id, task_id=t.id, reason=t.reason or "refused")
            for t in session.scalars(
                select(Task)
                .where(Task.round_id == row.id, Task.state == TaskState.REFUSED.value)
                .order_by(Task.node_id)
            )
        ]
        return RoundInfo(
            round_id=row.id,
            round=row.number,
            strategy=row.strategy,
            kind=UpdateKind(row.kind),
            state=RoundState(row.state),
            min_results=row.min_results,
            nodes=list(row.nodes),
            accepted=accepted_count(session, row.id),
            missing=missing,
            deadline=row.deadline,
            created_at=row.created_at,
            updated_at=row.updated_at,
            reason=row.reason,
            result_artifact=row.result_artifact,
            protection=round_protection(row) if row.protection else None,
            refusals=refusals,
        )

    def info(self, round_ref: str) -> RoundInfo:
        with self.db.session() as session:
            return self._info(session, round_row(session, round_ref))

    def recent(self, limit: int = 100) -> list[RoundInfo]:
        with self.db.session() as session:
            rows = session.scalars(select(Round).order_by(Round.number.desc()).limit(limit))
            return [self._info(session, r) for r in rows]

    def result(self, round_ref: str) -> Params:
        with self.db.session() as session:
            row = round_row(session, round_ref)
            if row.result_artifact is None:
                raise NotFoundError(f"round {row.number} has no result ({row.state})")
            return load_tensors(session, row.result_artifact)

    def activity_marker(self) -> tuple[int, tuple[str, ...]]:
        """Changes whenever a round starts, enters or leaves collecting: (newest number, collecting ids)."""
        with self.db.session() as session:
            newest = int(session.scalar(select(func.coalesce(func.max(Round.number), 0))) or 0)
            collecting = tuple(
                session.scalars(
                    select(Round.id).where(Round.state == RoundState.COLLECTING.value).order_by(Round.id)
                )
            )
        return newest, collecting
