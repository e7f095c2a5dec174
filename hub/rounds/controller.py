"""RoundController: rounds over real nodes, with every transition and every accepted update persisted.

Rounds survive a crash at any point: the state, the tasks and each accepted update are rows. Work that a
dead process had claimed (issuing tasks, aggregating) carries a ``claimed_at`` time; after the lease it
is taken over by whichever process ticks next. An update is a row keyed by its task, so a resend after a
crash is recognised and counted once. Several API workers can share one database: every state change is a
conditional UPDATE that only one of them wins.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edge_node.protocol.errors import EncodingError
from edge_node.protocol.tensors import decode_tensors, encode_tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import (
    NodeState,
    RefusalReceipt,
    RoundInfo,
    RoundProtection,
    RoundStart,
    RoundState,
    TaskRefusalInfo,
    TaskState,
    TensorShape,
    UpdateReceipt,
    UpdateSubmission,
)
from edge_node.protocol.wire import Task as WireTask
from hub.fl.codec import decode_result
from hub.fl.errors import FlError, PayloadError
from hub.fl.strategy import ClientFailure, ClientResult, Params
from hub.fl.validation import TensorSpec, update_problem
from hub.rounds.lifecycle import TERMINAL, check_transition
from hub.rounds.plan import COLLECTIONS, build_plan
from hub.service.audit import audit
from hub.service.errors import (
    ConflictError,
    DuplicateUpdateError,
    ForbiddenError,
    NotFoundError,
    RoundConfigError,
    TaskClosedError,
    UpdateRejected,
)
from hub.service.settings import HubSettings
from hub.store.artifacts import load_tensors, store_tensors
from hub.store.database import Database
from hub.store.schema import Artifact, Node, Round, Task, Update, utcnow

__all__ = ["RoundController"]

logger = logging.getLogger(__name__)


def _expected_json(expected: dict[str, TensorSpec]) -> list[dict[str, Any]]:
    return [
        {"name": n, "shape": list(s.shape), "dtype": s.dtype.str.lstrip("<>|=")} for n, s in expected.items()
    ]


def _expected_specs(rows: Sequence[dict[str, Any]]) -> dict[str, TensorSpec]:
    return {r["name"]: TensorSpec(tuple(r["shape"]), np.dtype(r["dtype"])) for r in rows}


class RoundController:
    """Start, feed, close and report rounds; safe to use from several threads and processes at once."""

    def __init__(self, db: Database, settings: HubSettings, *, instance: str | None = None) -> None:
        self.db = db
        self.settings = settings
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.lease = timedelta(seconds=settings.aggregation_lease_s)

    # -- starting -------------------------------------------------------------------------------------------

    def start(self, request: RoundStart, *, actor: str) -> RoundInfo:
        """Persist a new round (open), then issue its tasks (collecting)."""
        for _attempt in range(5):
            try:
                round_id = self._create(request, actor)
                break
            except IntegrityError:  # another process took the same round number: take the next one
                continue
        else:
            raise ConflictError("could not allocate a round number; retry")
        self._issue(round_id)
        return self.info(round_id)

    def _create(self, request: RoundStart, actor: str) -> str:
        now = utcnow()
        with self.db.session() as session:
            active = set(session.scalars(select(Node.id).where(Node.state == NodeState.ACTIVE.value)))
            nodes = sorted(set(request.nodes)) if request.nodes else sorted(active)
            unknown = [n for n in nodes if n not in active]
            if unknown:
                raise RoundConfigError(f"nodes {unknown[:5]} are not active; see `fedclinic-hub nodes list`")
            if not nodes:
                raise RoundConfigError("no active node to take part; enroll nodes first")
            if request.min_results > len(nodes):
                raise RoundConfigError(f"min_results {request.min_results} > the round's {len(nodes)} nodes")
            artifact = request.model_artifact or self._latest_result(session, request.strategy)
            start: Params = load_tensors(session, artifact) if artifact else {}
            try:
                plan = build_plan(request.strategy, request.config, start, nodes)
            except FlError as exc:
                raise RoundConfigError(str(exc)) from exc
            protection = self._checked_protection(request.protection, plan.kind, len(nodes))
            number = int(session.scalar(select(func.coalesce(func.max(Round.number), 0))) or 0) + 1
            row = Round(
                id="r-" + secrets.token_hex(6),
                number=number,
                strategy=request.strategy,
                kind=plan.kind.value,
                config=dict(request.config),
                state=RoundState.OPEN.value,
                nodes=nodes,
                min_results=request.min_results,
                deadline=now + timedelta(seconds=request.deadline_s),
                created_at=now,
                updated_at=now,
                reason=None,
                model_artifact=artifact,
                result_artifact=None,
                claimed_by=self.instance,
                claimed_at=now,
                protection=protection,
            )
            session.add(row)
            session.flush()
            audit(session, actor, "round.open", row.id, f"#{number} {request.strategy} nodes={len(nodes)}")
            logger.info("round %d (%s) opened with %d nodes", number, request.strategy, len(nodes))
            return row.id

    @staticmethod
    def _checked_protection(
        protection: RoundProtection | None, kind: UpdateKind, cohort: int
    ) -> dict[str, Any] | None:
        """The round's protection as stored, after checking that the hub can serve it."""
        if protection is None:
            return None
        try:
            protection.spec(kind, cohort)
        except ValueError as exc:
            raise RoundConfigError(f"protection: {exc}") from exc
        # The hub aggregates dense plain tensors; it does not yet decode compressed payloads or run the
        # secure-aggregation messages over the API, so it refuses to ask for them rather than fail later.
        if protection.secure_aggregation:
            raise RoundConfigError(
                "protection: secure aggregation is not served over the API by this hub yet; start the round "
                "without it (clipping and noise are available)"
            )
        if protection.compression.value != "none":
            raise RoundConfigError(
                f"protection: this hub does not decode {protection.compression.value} updates yet; "
                "use compression 'none'"
            )
        return protection.model_dump(mode="json")

    def _latest_result(self, session: Session, strategy: str) -> str | None:
        """The state the last published round of this strategy left (its saved state, else its result)."""
        if strategy in COLLECTIONS:
            return None
        row = session.scalars(
            select(Round)
            .where(Round.strategy == strategy, Round.state == RoundState.PUBLISHED.value)
            .order_by(Round.number.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        if row.strategy_state is not None:
            return store_tensors(
                session, decode_tensors(row.strategy_state), note=f"state after round {row.number}"
            )
        return row.result_artifact

    def _claim(
        self, session: Session, round_id: str, state: RoundState, *, new_state: RoundState | None = None
    ) -> bool:
        """Take the round's work if nobody holds a live claim on it; True when this process won."""
        now = utcnow()
        values: dict[str, Any] = {"claimed_by": self.instance, "claimed_at": now}
        if new_state is not None:
            values |= {"state": new_state.value, "updated_at": now}
        won = session.execute(
            update(Round)
            .where(
                Round.id == round_id,
                Round.state == state.value,
                or_(
                    Round.claimed_by == self.instance,
                    Round.claimed_at.is_(None),
                    Round.claimed_at < now - self.lease,
                    # A state change (collecting → aggregating) needs no lease: the state is the lock.
                    Round.state == RoundState.COLLECTING.value,
                ),
            )
            .values(**values)
        )
        return bool(won.rowcount == 1)  # type: ignore[attr-defined]

    def _set_state(self, session: Session, row: Round, target: RoundState, reason: str | None) -> None:
        check_transition(RoundState(row.state), target)
        row.state = target.value
        row.updated_at = utcnow()
        row.reason = reason
        audit(session, "hub", f"round.{target.value}", row.id, reason)
        logger.info("round %d: %s%s", row.number, target.value, f" ({reason})" if reason else "")

    def _issue(self, round_id: str) -> None:
        """open → collecting: write one task per node (idempotent if a crashed process began it)."""
        with self.db.session() as session:
            if not self._claim(session, round_id, RoundState.OPEN):
                return
            row = session.get(Round, round_id)
            assert row is not None  # claimed just above
            start = load_tensors(session, row.model_artifact) if row.model_artifact else {}
            plan = build_plan(row.strategy, row.config, start, row.nodes)
            have = set(session.scalars(select(Task.node_id).where(Task.round_id == round_id)))
            now = utcnow()
            for planned in plan.tasks(row.number, row.nodes):
                if planned.node_id in have:
                    continue
                session.add(
                    Task(
                        id="t-" + secrets.token_hex(8),
                        round_id=round_id,
                        node_id=planned.node_id,
                        state=TaskState.OPEN.value,
                        config=dict(planned.config),
                        params_artifact=store_tensors(session, planned.params),
                        expected=_expected_json(planned.expected),
                        created_at=now,
                        done_at=None,
                    )
                )
            row.kind = plan.kind.value
            row.claimed_by = None
            row.claimed_at = None
            self._set_state(session, row, RoundState.COLLECTING, None)

    # -- nodes ----------------------------------------------------------------------------------------------

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
            protection=self._protection(rnd).spec(UpdateKind(rnd.kind), len(rnd.nodes)),
        )

    @staticmethod
    def _protection(rnd: Round) -> RoundProtection:
        return RoundProtection.model_validate(rnd.protection) if rnd.protection else RoundProtection()

    def refuse(self, node_id: str, task_id: str, reason: str) -> RefusalReceipt:
        """Record a node's refusal of its task: the task closes with the reason, a failure for k-of-n."""
        with self.db.session() as session:
            task = self._own_task(session, node_id, task_id)
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

    @staticmethod
    def _refused(session: Session, round_id: str) -> int:
        return int(
            session.scalar(
                select(func.count(Task.id)).where(
                    Task.round_id == round_id, Task.state == TaskState.REFUSED.value
                )
            )
            or 0
        )

    def task_params(self, node_id: str, task_id: str) -> bytes:
        with self.db.session() as session:
            task = self._own_task(session, node_id, task_id)
            artifact = session.get(Artifact, task.params_artifact)
            if artifact is None or artifact.data is None:
                raise NotFoundError(f"the tensors of task {task_id} are gone from the store")
            return artifact.data

    def _own_task(self, session: Session, node_id: str, task_id: str) -> Task:
        task = session.get(Task, task_id)
        if task is None:
            raise NotFoundError(f"no task {task_id!r}")
        if task.node_id != node_id:
            raise ForbiddenError("this task belongs to another node")
        return task

    def submit(self, node_id: str, task_id: str, submission: UpdateSubmission) -> UpdateReceipt:
        """Validate and keep one update; nothing is written unless it is accepted."""
        try:
            receipt, complete = self._submit(node_id, task_id, submission)
        except IntegrityError:
            # The same task was answered concurrently (an outbox retry racing itself): decide again.
            receipt, complete = self._submit(node_id, task_id, submission)
        if complete:
            self.close_round(receipt.round_id)
        return receipt

    def _submit(self, node_id: str, task_id: str, sub: UpdateSubmission) -> tuple[UpdateReceipt, bool]:
        env = sub.envelope
        if sub.task_id != task_id:
            raise UpdateRejected(f"the body names task {sub.task_id!r}, the URL task {task_id!r}")
        with self.db.session() as session:
            task = self._own_task(session, node_id, task_id)
            if env.node_id != node_id:
                raise ForbiddenError("the envelope names another node; a node submits only its own updates")
            rnd = session.get(Round, task.round_id)
            assert rnd is not None  # foreign key
            previous = session.scalars(select(Update).where(Update.task_id == task_id)).one_or_none()
            if previous is not None:
                if previous.payload_sha256 == env.payload_sha256:
                    return self._receipt(rnd, previous, first_time=False), False
                raise DuplicateUpdateError("another update was already accepted for this task")
            now = utcnow()
            if rnd.state != RoundState.COLLECTING.value or task.state != TaskState.OPEN.value:
                raise TaskClosedError(f"round {rnd.number} is {rnd.state}: the update arrived too late")
            if now >= rnd.deadline:
                raise TaskClosedError(f"the deadline of round {rnd.number} has passed: the update is late")
            if env.round != rnd.number:
                raise UpdateRejected(f"the update is for round {env.round}, the task's round is {rnd.number}")
            if env.kind.value != rnd.kind:
                raise UpdateRejected(f"the update is of kind {env.kind.value}, the task asked for {rnd.kind}")
            try:
                payload = base64.b64decode(sub.payload_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise UpdateRejected("payload_b64 is not valid base64") from exc
            try:
                result = decode_result(
                    env,
                    payload,
                    max_bytes=self.settings.max_update_bytes,
                    max_unpacked_bytes=self.settings.max_unpacked_bytes,
                )
            except (PayloadError, EncodingError) as exc:
                raise UpdateRejected(f"payload refused: {exc}") from exc
            max_norm = rnd.config.get("max_norm")
            problem = update_problem(
                result.update,
                _expected_specs(task.expected),
                max_norm=float(max_norm) if isinstance(max_norm, (int, float)) else None,
            )
            if problem is not None:
                raise UpdateRejected(problem)
            row = Update(
                task_id=task_id,
                round_id=rnd.id,
                node_id=node_id,
                payload_sha256=env.payload_sha256,
                payload=payload,
                num_examples=env.num_examples,
                metrics=dict(env.metrics),
                received_at=now,
            )
            session.add(row)
            task.state = TaskState.DONE.value
            task.done_at = now
            session.flush()
            done = int(session.scalar(select(func.count(Update.id)).where(Update.round_id == rnd.id)) or 0)
            audit(session, node_id, "update.accepted", task_id, f"round={rnd.number} bytes={len(payload)}")
            refused = self._refused(session, rnd.id)
            return self._receipt(rnd, row, first_time=True), done + refused >= len(rnd.nodes)

    @staticmethod
    def _receipt(rnd: Round, row: Update, *, first_time: bool) -> UpdateReceipt:
        return UpdateReceipt(
            task_id=row.task_id, round_id=rnd.id, first_time=first_time, received_at=row.received_at
        )

    # -- closing --------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Close rounds whose deadline passed; take over work a dead process had claimed."""
        now = utcnow()
        with self.db.session() as session:
            due = list(
                session.scalars(
                    select(Round.id).where(Round.state == RoundState.COLLECTING.value, Round.deadline <= now)
                )
            )
            stale_open = list(
                session.scalars(
                    select(Round.id).where(
                        Round.state == RoundState.OPEN.value,
                        or_(Round.claimed_at.is_(None), Round.claimed_at < now - self.lease),
                    )
                )
            )
            stale_agg = list(
                session.scalars(
                    select(Round.id).where(
                        Round.state == RoundState.AGGREGATING.value,
                        or_(Round.claimed_at.is_(None), Round.claimed_at < now - self.lease),
                    )
                )
            )
        for round_id in stale_open:
            self._issue(round_id)
        for round_id in due + stale_agg:
            self.close_round(round_id)

    def close_round(self, round_id: str) -> None:
        """collecting → aggregating → published | failed, when every node answered or the deadline passed."""
        now = utcnow()
        with self.db.session() as session:
            row = session.get(Round, round_id)
            if row is None:
                return
            if row.state == RoundState.COLLECTING.value:
                done = int(
                    session.scalar(select(func.count(Update.id)).where(Update.round_id == round_id)) or 0
                )
                refused = self._refused(session, round_id)
                if done + refused < len(row.nodes) and now < row.deadline:
                    return
                if done < row.min_results:
                    if self._claim(session, round_id, RoundState.COLLECTING):
                        session.refresh(row)
                        self._close_tasks(session, round_id)
                        self._set_state(
                            session,
                            row,
                            RoundState.FAILED,
                            f"{'deadline passed' if now >= row.deadline else 'every node answered'} "
                            f"with {done} of the {row.min_results} results required"
                            + (f" ({refused} refused by their privacy floor)" if refused else ""),
                        )
                        row.claimed_by = None
                    return
                check_transition(RoundState.COLLECTING, RoundState.AGGREGATING)
                if not self._claim(
                    session, round_id, RoundState.COLLECTING, new_state=RoundState.AGGREGATING
                ):
                    return
                self._close_tasks(session, round_id)
                audit(session, "hub", "round.aggregating", round_id, f"{done} of {len(row.nodes)} answered")
            elif row.state == RoundState.AGGREGATING.value:
                if not self._claim(session, round_id, RoundState.AGGREGATING):
                    return
            else:
                return
        self._aggregate(round_id)

    @staticmethod
    def _close_tasks(session: Session, round_id: str) -> None:
        session.execute(
            update(Task)
            .where(Task.round_id == round_id, Task.state == TaskState.OPEN.value)
            .values(state=TaskState.CLOSED.value)
        )

    def _aggregate(self, round_id: str) -> None:
        with self.db.session() as session:
            row = session.get(Round, round_id)
            assert row is not None
            start = load_tensors(session, row.model_artifact) if row.model_artifact else {}
            updates = list(
                session.scalars(select(Update).where(Update.round_id == round_id).order_by(Update.node_id))
            )
            number, strategy, config, nodes = row.number, row.strategy, dict(row.config), list(row.nodes)
            refusals = {
                t.node_id: t.reason or "refused"
                for t in session.scalars(
                    select(Task).where(Task.round_id == round_id, Task.state == TaskState.REFUSED.value)
                )
            }
        answered = {u.node_id for u in updates}
        results = [
            ClientResult(u.node_id, number, int(u.num_examples), decode_tensors(u.payload), dict(u.metrics))
            for u in updates
        ]
        failures = [
            ClientFailure(n, number, refusals.get(n, "no update before the deadline"))
            for n in nodes
            if n not in answered
        ]
        new: Params | None
        state: Params | None = None
        try:
            plan = build_plan(strategy, config, start, nodes)
            plan.tasks(number, nodes)  # the strategy learns what it asked for, as when the round began
            new, reason = plan.aggregate(number, results, failures)
            state = plan.state() if new is not None else None
        except FlError as exc:
            new, reason = None, f"aggregation failed: {exc}"
        with self.db.session() as session:
            row = session.get(Round, round_id)
            assert row is not None
            if row.state != RoundState.AGGREGATING.value or row.claimed_by != self.instance:
                return  # another process took over after our lease ran out; it will finish the round
            if new is None:
                self._set_state(session, row, RoundState.FAILED, reason)
            else:
                row.result_artifact = store_tensors(session, new, note=f"round {number} {strategy}")
                row.strategy_state = encode_tensors(state, compress=False) if state else None
                self._set_state(session, row, RoundState.PUBLISHED, f"aggregated {len(results)} updates")
            row.claimed_by = None
            row.claimed_at = None

    def cancel(self, round_id: str, *, actor: str) -> RoundInfo:
        with self.db.session() as session:
            row = self._get(session, round_id)
            if RoundState(row.state) in TERMINAL or row.state == RoundState.AGGREGATING.value:
                raise ConflictError(
                    f"round {row.number} is {row.state}; only open or collecting rounds can be cancelled"
                )
            self._close_tasks(session, round_id)
            self._set_state(session, row, RoundState.FAILED, f"cancelled by {actor}")
        return self.info(round_id)

    def activity_marker(self) -> tuple[int, int]:
        """Changes whenever a round starts or leaves collecting: (newest round number, rounds collecting)."""
        with self.db.session() as session:
            newest = int(session.scalar(select(func.coalesce(func.max(Round.number), 0))) or 0)
            collecting = int(
                session.scalar(select(func.count(Round.id)).where(Round.state == RoundState.COLLECTING.value))
                or 0
            )
        return newest, collecting

    # -- reporting ------------------------------------------------------------------------------------------

    def _get(self, session: Session, round_ref: str) -> Round:
        row = session.get(Round, round_ref)
        if row is None and round_ref.isdigit():
            row = session.scalars(select(Round).where(Round.number == int(round_ref))).one_or_none()
        if row is None:
            raise NotFoundError(f"no round {round_ref!r}; see `fedclinic-hub rounds list`")
        return row

    def _info(self, session: Session, row: Round) -> RoundInfo:
        accepted = int(session.scalar(select(func.count(Update.id)).where(Update.round_id == row.id)) or 0)
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
            accepted=accepted,
            missing=missing,
            deadline=row.deadline,
            created_at=row.created_at,
            updated_at=row.updated_at,
            reason=row.reason,
            result_artifact=row.result_artifact,
            protection=self._protection(row) if row.protection else None,
            refusals=refusals,
        )

    def info(self, round_ref: str) -> RoundInfo:
        with self.db.session() as session:
            return self._info(session, self._get(session, round_ref))

    def recent(self, limit: int = 100) -> list[RoundInfo]:
        with self.db.session() as session:
            rows = session.scalars(select(Round).order_by(Round.number.desc()).limit(limit))
            return [self._info(session, r) for r in rows]

    def result(self, round_ref: str) -> Params:
        with self.db.session() as session:
            row = self._get(session, round_ref)
            if row.result_artifact is None:
                raise NotFoundError(f"round {row.number} has no result ({row.state})")
            return load_tensors(session, row.result_artifact)
