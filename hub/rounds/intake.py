"""UpdateIntake: an update is validated and kept as one row keyed by its task, or refused with a reason.

The row is what makes an update count exactly once: a resend after a crash finds it and gets the first
receipt back; a different payload for the same task is refused. Nothing is written unless it is accepted.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from edge_node.protocol.errors import EncodingError
from edge_node.protocol.wire import RoundState, TaskState, UpdateReceipt, UpdateSubmission
from hub.fl.codec import decode_result
from hub.fl.errors import PayloadError
from hub.fl.strategy import Params
from hub.fl.validation import update_problem
from hub.rounds.answer_checks import answer_problem
from hub.rounds.decoded_updates import DecodedUpdates
from hub.rounds.ledger import answered_count
from hub.rounds.round_codec import dense_update, round_compressor
from hub.rounds.secagg_desk import is_secagg
from hub.rounds.task_desk import own_task
from hub.rounds.tensor_specs import expected_specs
from hub.service.audit import audit
from hub.service.errors import DuplicateUpdateError, ForbiddenError, TaskClosedError, UpdateRejected
from hub.service.settings import HubSettings
from hub.store.database import Database
from hub.store.schema import Round, Update, utcnow

__all__ = ["UpdateIntake"]


def _receipt(rnd: Round, row: Update, *, first_time: bool) -> UpdateReceipt:
    return UpdateReceipt(
        task_id=row.task_id, round_id=rnd.id, first_time=first_time, received_at=row.received_at
    )


class UpdateIntake:
    """Take updates from nodes; the one that completes a round calls ``close_round``."""

    def __init__(
        self,
        db: Database,
        settings: HubSettings,
        close_round: Callable[[str], None],
        decoded: DecodedUpdates | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.close_round = close_round
        self.decoded = decoded if decoded is not None else DecodedUpdates()

    def submit(self, node_id: str, task_id: str, submission: UpdateSubmission) -> UpdateReceipt:
        """Validate and keep one update; nothing is written unless it is accepted."""
        try:
            receipt, complete, tensors = self.accept(node_id, task_id, submission)
        except IntegrityError:
            # The same task was answered concurrently (an outbox retry racing itself): decide again.
            receipt, complete, tensors = self.accept(node_id, task_id, submission)
        if tensors is not None:  # committed: the aggregation may use the tensors decoded here
            self.decoded.keep(receipt.round_id, node_id, submission.envelope.payload_sha256, tensors)
        if complete:
            self.close_round(receipt.round_id)
        return receipt

    def accept(
        self, node_id: str, task_id: str, sub: UpdateSubmission
    ) -> tuple[UpdateReceipt, bool, Params | None]:
        """Store the update (or find the one kept before).

        Returns the receipt, whether every node of the round has now answered, and the decoded tensors of
        an update accepted just now (None for a resend).
        """
        env = sub.envelope
        if sub.task_id != task_id:
            raise UpdateRejected(f"the body names task {sub.task_id!r}, the URL task {task_id!r}")
        with self.db.session() as session:
            task = own_task(session, node_id, task_id)
            if env.node_id != node_id:
                raise ForbiddenError("the envelope names another node; a node submits only its own updates")
            rnd = session.get(Round, task.round_id)
            assert rnd is not None  # foreign key
            previous = session.scalars(select(Update).where(Update.task_id == task_id)).one_or_none()
            if previous is not None:
                if previous.payload_sha256 == env.payload_sha256:
                    return _receipt(rnd, previous, first_time=False), False, None
                raise DuplicateUpdateError("another update was already accepted for this task")
            now = utcnow()
            if rnd.state != RoundState.COLLECTING.value or task.state != TaskState.OPEN.value:
                raise TaskClosedError(f"round {rnd.number} is {rnd.state}: the update arrived too late")
            if now >= rnd.deadline:
                raise TaskClosedError(f"the deadline of round {rnd.number} has passed: the update is late")
            if is_secagg(rnd):
                raise UpdateRejected(
                    f"round {rnd.number} runs secure aggregation: send the masked input to "
                    f"/v1/secagg/{rnd.id}/masked, never a plain update"
                )
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
            expected = expected_specs(task.expected)
            try:
                # A compressed round's wire tensors are checked as the dense update they decode to.
                dense = dense_update(round_compressor(rnd.protection), result.update, expected)
            except EncodingError as exc:
                raise UpdateRejected(f"payload refused: {exc}") from exc
            max_norm = rnd.config.get("max_norm")
            problem = update_problem(
                dense,
                expected,
                max_norm=float(max_norm) if isinstance(max_norm, (int, float)) else None,
            )
            if problem is None:
                problem = answer_problem(rnd.kind, dense)
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
            audit(session, node_id, "update.accepted", task_id, f"round={rnd.number} bytes={len(payload)}")
            session.flush()
            complete = answered_count(session, rnd.id) >= len(rnd.nodes)
            return _receipt(rnd, row, first_time=True), complete, dense
