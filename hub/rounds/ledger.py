"""What a round's answers add up to: accepted updates and refused tasks, counted in the store."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edge_node.protocol.wire import TaskState
from hub.store.schema import Task, Update

__all__ = ["accepted_count", "answered_count", "refused_count"]


def accepted_count(session: Session, round_id: str) -> int:
    return int(session.scalar(select(func.count(Update.id)).where(Update.round_id == round_id)) or 0)


def refused_count(session: Session, round_id: str) -> int:
    return int(
        session.scalar(
            select(func.count(Task.id)).where(
                Task.round_id == round_id, Task.state == TaskState.REFUSED.value
            )
        )
        or 0
    )


def answered_count(session: Session, round_id: str) -> int:
    """Tasks of the round that have their answer: an accepted update or a refusal (one query)."""
    return int(
        session.scalar(
            select(func.count(Task.id)).where(
                Task.round_id == round_id, Task.state.in_([TaskState.DONE.value, TaskState.REFUSED.value])
            )
        )
        or 0
    )
