"""TaskDesk: what a node sees of rounds: its open tasks, their starting tensors, and its refusals."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import (
    RefusalReceipt,
    RoundProtection,
    RoundState,
    TaskState,
    TensorShape,
)
from edge_node.protocol.wire import Task as WireTask
from hub.service.audit import audit
from hub.service.errors import ForbiddenError, NotFoundError, TaskClosedError
from hub.service.settings import HubSettings
from hub.store.database import Database
from hub.store.schema import Artifact, Round, Task, utcnow

__all__ = ["TaskDesk", "own_task", "round_protection"]

logger = logging.getLogger(__name__)


def own_task(session: Session, node_id: str, task_id: str) -> Task:
    """The task, if it exists and belongs to ``node_id``; a node never touches another node's task."""
    task = session.get(Task, task_id)
    if task is None:
        raise NotFoundError(f"no task {task_id!r}")
    if task.node_id != node_id:
        raise ForbiddenError("this task belongs to another node")
    return task


def round_protection(rnd: Round) -> RoundProtection:
    return RoundProtection.model_validate(rnd.protection) if rnd.protection else RoundProtection()


class TaskDesk:
    """Answer nodes about their tasks; a refusal may complete a round, so it calls ``close_round``."""

    def __init__(self, db: Database, settings: HubSettings, close_round: Callable[[str], None]) -> None:
        self.db = db
        self.settings = settings
        self.close_round = close_round

    def open_tasks(self, node_id: str) -> list[WireTask]:
        now = utcnow()
        with self.db.session() as session:
            rows = session.execute(
                select(Task, Round, Artifact)
                .join(Round, Round.id == Task.round_id)
                .join(Artifact, Artifact.id == Task.params_artifact)
                .where(
                    Task.node_id == node_id,
                    Task.state == TaskState.OPEN.value,
                    Round.state == RoundState.COLLECTING.value,
                    Round.deadline > now,
                )
                .order_by(Round.number)
                # A node polls often: its task's row is all it needs, not the tensors or strategy state.
                .options(defer(Artifact.data), defer(Round.strategy_state))
            ).all()
            return [self._wire_task(t, r, a) for t, r, a in rows]

    def count_open_tasks(self, session: Session, node_id: str) -> int:
        return int(
            session.scalar(
                select(func.count(Task.id))
                .join(Round, Round.id == Task.round_id)
                .where(
                    Task.node_id == node_id,
                    Task.state == TaskState.OPEN.value,
                    Round.state == RoundState.COLLECTING.value,
                    Round.deadline > utcnow(),
                )
            )
            or 0
        )

    def _wire_task(self, task: Task, rnd: Round, artifact: Artifact) -> WireTask:
        return WireTask(
            task_id=task.id,
            round_id=rnd.id,
            round=rnd.number,
            kind=UpdateKind(rnd.kind),
            strategy=rnd.strategy,
            config=dict(task.config),
            deadline=rnd.deadline,
            state=TaskState(task.state),
            params_sha256=artifact.sha256,
            params_bytes=artifact.size,
            expected=[TensorShape(**e) for e in task.expected],
            max_update_bytes=self.settings.max_update_bytes,
            protection=round_protection(rnd).spec(UpdateKind(rnd.kind), len(rnd.nodes)),
        )

    def refuse(self, node_id: str, task_id: str, reason: str) -> RefusalReceipt:
        """Record a node's refusal of its task: the task closes with the reason, a failure for k-of-n."""
        with self.db.session() as session:
            task = own_task(session, node_id, task_id)
            rnd = session.get(Round, task.round_id)
            assert rnd is not None  # foreign key
            if task.state == TaskState.REFUSED.value:
                return RefusalReceipt(task_id=task_id, round_id=rnd.id, recorded_at=task.done_at or utcnow())
            if rnd.state != RoundState.COLLECTING.value or task.state != TaskState.OPEN.value:
                raise TaskClosedError(f"round {rnd.number} is {rnd.state}: the task is no longer open")
            now = utcnow()
            task.state = TaskState.REFUSED.value
            task.reason = reason
            task.done_at = now
            audit(session, node_id, "task.refused", task_id, f"round={rnd.number}: {reason}")
            logger.info("round %d: node %s refused its task: %s", rnd.number, node_id, reason)
            round_id = rnd.id
        self.close_round(round_id)
        return RefusalReceipt(task_id=task_id, round_id=round_id, recorded_at=now)

    def task_params(self, node_id: str, task_id: str) -> bytes:
        with self.db.session() as session:
            task = own_task(session, node_id, task_id)
            artifact = session.get(Artifact, task.params_artifact)
            if artifact is None or artifact.data is None:
                raise NotFoundError(f"the tensors of task {task_id} are gone from the store")
            return artifact.data
