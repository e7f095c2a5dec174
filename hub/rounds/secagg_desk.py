"""SecAggDesk: a round's secure aggregation over the API: each step's messages, step closing, the sum.

The hub is the protocol's relay. Each node message is kept as one row keyed by (round, node, step), so a
second message of a step is a replay and is refused; each closed step is a row that fixes who took part.
Every message is checked, before it is kept, by a ``SecAggServer`` fed the stored rows (signature, binding
to the round, membership of the previous step), so several API processes agree without shared memory; each
worker keeps that server between requests and feeds it only the rows it lacks (``SecAggServers``). A
request reads the round's progress as node ids (who sent what, which steps closed), never message bodies
unless its worker's server lacks them.

A step closes when every node of the previous step has sent its message, or ``secagg_step_s`` after the
previous step closed (the first step: that long three times before the round's deadline, the time the
later steps need). A step that closes with fewer than the threshold's nodes fails the round with the
reason. When the unmask step closes, the sum of the survivors' inputs is rebuilt and kept (ring elements):
the hub only ever stores masked vectors and that sum. A message that completes its step closes it at once
(after its commit); a step due by time closes on the tick, or on the next message of the round. Listeners
(``watch``) hear of closings, which long-polling relays wait for.

Nodes sign with an Ed25519 key made for the round and sent with ``AdvertiseKeys``; the hub binds it to the
node's API credential (the request's sender). The trust model is an honest-but-curious hub: nodes take
the peers' signing keys from the hub's roster (see docs/hub-service.md).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edge_node.protocol.errors import SecAggError
from edge_node.protocol.protection import secagg_threshold
from edge_node.protocol.secagg import (
    AdvertiseKeys,
    MaskedInput,
    SecAggMessage,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    decode_fixed,
    unflatten,
)
from edge_node.protocol.secagg_exchange import SecAggReceipt, SecAggRelay, SecAggStep
from edge_node.protocol.tensors import decode_tensors, encode_tensors
from edge_node.protocol.wire import RoundProtection, RoundState, TaskState
from hub.fl.secagg import SecAggServer
from hub.fl.strategy import Params
from hub.fl.validation import TensorSpec
from hub.rounds.secagg_servers import Bodies, FedServer, SecAggServers, ServerSlot
from hub.rounds.task_desk import round_protection
from hub.rounds.tensor_specs import expected_specs
from hub.rounds.transition import enter_state
from hub.service.audit import audit
from hub.service.errors import (
    ConflictError,
    ForbiddenError,
    HubServiceError,
    NotFoundError,
    UpdateRejected,
)
from hub.service.settings import HubSettings
from hub.store.database import Database
from hub.store.schema import Round, SecAggMessageRow, SecAggStepRow, Task, utcnow

__all__ = ["SUM_CLIENT", "SecAggDesk", "SecAggSum", "is_secagg", "secagg_threshold"]

logger = logging.getLogger(__name__)

STEPS = list(SecAggStep)
#: The one client a strategy sees in a round under secure aggregation: the survivors' sum.
SUM_CLIENT = "secagg-sum"
_RING_SUM = "ring_sum"
#: Fixed-point bits of the ring encoding: the protocol's default, which the nodes' clients use too.
_FRAC_BITS = 16
#: Closed steps whose relay body a worker keeps (four rounds' worth of the three relayed steps).
_KEPT_RELAYS = 12
#: A key nobody holds: a node that has not advertised yet cannot sign as itself.
_NOBODY = Ed25519PrivateKey.generate().public_key()


def is_secagg(rnd: Round) -> bool:
    return bool(rnd.protection) and round_protection(rnd).secure_aggregation


class SecAggSum:
    """A round's unmasked result: the survivors and the float sum of their inputs in the task's layout."""

    def __init__(self, survivors: list[str], total: Params) -> None:
        self.survivors = survivors
        self.total = total

    def mean(self) -> Params:
        """The unweighted mean of the survivors' inputs (every node counts once, as FedAvg over nodes)."""
        k = len(self.survivors)
        return {name: (arr.astype(np.float64) / k).astype(arr.dtype) for name, arr in self.total.items()}


def _layout(session: Session, round_id: str) -> dict[str, TensorSpec]:
    task = session.scalars(select(Task).where(Task.round_id == round_id).limit(1)).one()
    return expected_specs(task.expected)


def _message(step: SecAggStep, body: Mapping[str, Any]) -> SecAggMessage:
    if step is SecAggStep.ADVERTISE:
        return AdvertiseKeys.model_validate(body["message"])
    if step is SecAggStep.SHARE:
        return ShareKeys.model_validate(body)
    if step is SecAggStep.MASKED:
        return MaskedInput.model_validate(body)
    return UnmaskResponse.model_validate(body)


def _public(hex_key: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except ValueError as exc:
        raise UpdateRejected("the advertised signing key is not an Ed25519 public key") from exc


@dataclass(frozen=True)
class _RoundRow:
    """What the desk reads of a round on each request: a few columns, not the row with its blobs."""

    id: str
    number: int
    state: str
    reason: str | None
    nodes: list[str]
    deadline: datetime
    protection: dict[str, Any] | None

    @property
    def secagg(self) -> bool:
        return bool(self.protection) and RoundProtection.model_validate(self.protection).secure_aggregation

    @property
    def threshold(self) -> int:
        stated = RoundProtection.model_validate(self.protection).secagg_threshold if self.protection else None
        return secagg_threshold(stated, len(self.nodes))


# The statements of every request, built once (building one costs about as much as running it).
_ROUND_ROW = select(
    Round.id, Round.number, Round.state, Round.reason, Round.nodes, Round.deadline, Round.protection
).where(Round.id == bindparam("round_id"))
_CLOSED_STEPS = select(SecAggStepRow.step, SecAggStepRow.members, SecAggStepRow.closed_at).where(
    SecAggStepRow.round_id == bindparam("round_id")
)
_STEP_MEMBERS = select(SecAggStepRow.members).where(
    SecAggStepRow.round_id == bindparam("round_id"), SecAggStepRow.step == bindparam("step")
)
_SENDERS = select(SecAggMessageRow.step, SecAggMessageRow.node_id).where(
    SecAggMessageRow.round_id == bindparam("round_id")
)
_STEP_SENDERS = select(SecAggMessageRow.node_id).where(
    SecAggMessageRow.round_id == bindparam("round_id"), SecAggMessageRow.step == bindparam("step")
)


def _round_row(session: Session, round_id: str) -> _RoundRow | None:
    row = session.execute(_ROUND_ROW, {"round_id": round_id}).one_or_none()
    return None if row is None else _RoundRow(*row)


@dataclass(frozen=True)
class _Closed:
    members: list[str]
    closed_at: datetime


class _Progress:
    """Where a round's secure aggregation stands: the closed steps and who sent each step's message.

    Node ids only, never message bodies: this is read on every request.
    """

    def __init__(self, session: Session, round_id: str) -> None:
        # Closed steps first: a step's row is written after its messages, so they are all found below. A
        # message that raced the closing of its step is not part of it and is left out (``kept``).
        self.closed: dict[SecAggStep, _Closed] = {
            SecAggStep(step): _Closed(list(members), closed_at)
            for step, members, closed_at in session.execute(_CLOSED_STEPS, {"round_id": round_id})
        }
        self.sent: dict[SecAggStep, set[str]] = {s: set() for s in STEPS}
        for step, node in session.execute(_SENDERS, {"round_id": round_id}):
            self.sent[SecAggStep(step)].add(node)

    def kept(self) -> dict[SecAggStep, set[str]]:
        """The stored messages that count: of a closed step only its members'."""
        out = {}
        for step in STEPS:
            closed = self.closed.get(step)
            out[step] = self.sent[step] & set(closed.members) if closed is not None else set(self.sent[step])
        return out


def _bodies(session: Session, round_id: str) -> Bodies:
    """Reads stored messages (and masked payloads) of the nodes given, for a server that lacks them."""

    def read(step: SecAggStep, nodes: list[str]) -> dict[str, tuple[dict[str, Any], bytes | None]]:
        where = (
            SecAggMessageRow.round_id == round_id,
            SecAggMessageRow.step == step.value,
            SecAggMessageRow.node_id.in_(nodes),
        )
        if step is SecAggStep.MASKED:
            row = SecAggMessageRow
            rows = session.execute(select(row.node_id, row.body, row.payload).where(*where))
            return {node: (body, payload) for node, body, payload in rows}
        plain = session.execute(select(SecAggMessageRow.node_id, SecAggMessageRow.body).where(*where))
        return {node: (body, None) for node, body in plain}

    return read


class _StepDue(Exception):
    """A step of the round is due to close by time: close it before taking the message."""


class SecAggDesk:
    """Take nodes' protocol messages, relay closed steps, close steps on time; ``close_round`` at the end."""

    def __init__(self, db: Database, settings: HubSettings, close_round: Callable[[str], None]) -> None:
        self.db = db
        self.settings = settings
        self.close_round = close_round
        self._servers = SecAggServers()
        self._relays: OrderedDict[tuple[str, SecAggStep], bytes] = OrderedDict()
        self._relays_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        #: Closed steps this worker knows of, per collecting round under secure aggregation (the tick's view
        #: and this worker's own closings): a tick that finds more, or other rounds, tells the listeners.
        self._known: dict[str, int] | None = None
        self._known_lock = threading.Lock()

    def watch(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from any thread) when a step may have closed or a round failed.

        Closings in this process call it at once; the tick calls it when it finds closings (or rounds that
        stopped collecting) it had not seen, such as another worker's. Long-polling relays wait on it.
        """
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _server(self, session: Session, rnd: _RoundRow, progress: _Progress, slot: ServerSlot) -> FedServer:
        """The slot's server of the round (taken out of it) fed every stored (checked) row, else a new one."""
        fed, slot.fed = slot.fed, None
        kept, closed, bodies = progress.kept(), set(progress.closed), _bodies(session, rnd.id)
        if fed is not None:
            try:
                if fed.catch_up(kept, closed, bodies, _public):
                    return fed
            except SecAggError:  # it disagrees with the store: the store is the truth
                pass
        fed = FedServer(
            SecAggServer(
                task_id=rnd.id,
                round=rnd.number,
                node_keys={n: _NOBODY for n in rnd.nodes},
                threshold=rnd.threshold,
                layout=_layout(session, rnd.id),
                frac_bits=_FRAC_BITS,
            )
        )
        fed.catch_up(kept, closed, bodies, _public)
        return fed

    def _due(self, rnd: _RoundRow, progress: _Progress, now: datetime) -> bool:
        """Whether the round's open step closes by time now (a step all its nodes answered closes at once)."""
        step_s = timedelta(seconds=self.settings.secagg_step_s)
        for index, step in enumerate(STEPS):
            if step in progress.closed:
                continue
            if index == 0:
                return now >= rnd.deadline - 3 * step_s
            return now >= progress.closed[STEPS[index - 1]].closed_at + step_s
        return False

    # -- nodes ---------------------------------------------------------------------------------------------

    def receive(
        self,
        node_id: str,
        round_id: str,
        step: SecAggStep,
        body: SecAggMessage,
        *,
        signing_public: str | None = None,
        payload: bytes | None = None,
    ) -> SecAggReceipt:
        """Check and keep one node message; a refusal is recorded in the audit log with its reason."""
        check_due = True
        while True:
            try:
                with self._servers.hold(round_id) as slot:
                    fed, rnd, progress = self._keep(
                        node_id, round_id, step, body, signing_public, payload, slot, check_due
                    )
                    # Kept only now that the message is committed: the server then matches the store.
                    fed.fed[step].add(node_id)
                    slot.fed = fed
                break
            except _StepDue:
                # A step that is due closes first (once), so a late message is refused as such.
                check_due = False
                self.advance(round_id)
            except IntegrityError:  # the same message raced itself in two requests: the second is a replay
                self._refused(node_id, round_id, step, "a second message for this step (replay)")
                reason = f"refused: {node_id} already sent its {step.value} message (replay)"
                raise ConflictError(reason) from None
            except HubServiceError as exc:
                self._refused(node_id, round_id, step, str(exc))
                raise
        if self._completes(rnd, progress, step):
            self.advance(round_id)
        return SecAggReceipt(round_id=round_id, node_id=node_id, step=step)

    def _completes(self, rnd: _RoundRow, progress: _Progress, step: SecAggStep) -> bool:
        """Whether every node the step waits for has now sent its message (read after this one's commit).

        Read again, not taken from ``progress``: two last messages in two requests each miss the other.
        """
        index = STEPS.index(step)
        waiting = set(rnd.nodes) if index == 0 else set(progress.closed[STEPS[index - 1]].members)
        with self.db.session() as session:
            sent = set(session.scalars(_STEP_SENDERS, {"round_id": rnd.id, "step": step.value}))
            missing = waiting - sent
            if missing and index == 0:
                missing -= self._refused_tasks(session, rnd.id)
        return not missing

    @staticmethod
    def _refused_tasks(session: Session, round_id: str) -> set[str]:
        """Nodes that refused the round's task: the first step does not wait for them."""
        return set(
            session.scalars(
                select(Task.node_id).where(Task.round_id == round_id, Task.state == TaskState.REFUSED.value)
            )
        )

    def _keep(
        self,
        node_id: str,
        round_id: str,
        step: SecAggStep,
        body: SecAggMessage,
        signing_public: str | None,
        payload: bytes | None,
        slot: ServerSlot,
        check_due: bool,
    ) -> tuple[FedServer, _RoundRow, _Progress]:
        now = utcnow()
        with self.db.session() as session:
            rnd = self._round(session, round_id, node_id)
            if body.node_id != node_id:
                raise ForbiddenError(
                    f"refused: a {step.value} message claiming {body.node_id!r} "
                    f"sent with {node_id!r}'s credential"
                )
            if (body.task_id, body.round) != (rnd.id, rnd.number):
                raise ConflictError(
                    f"refused: a {step.value} message bound to round {body.task_id!r} #{body.round}; "
                    f"this is round {rnd.id!r} #{rnd.number}"
                )
            progress = _Progress(session, rnd.id)
            if check_due and rnd.state == RoundState.COLLECTING.value and self._due(rnd, progress, now):
                raise _StepDue
            if node_id in progress.sent[step]:
                raise ConflictError(f"refused: {node_id} already sent its {step.value} message (replay)")
            if rnd.state != RoundState.COLLECTING.value:
                raise ConflictError(f"refused: round {rnd.number} is {rnd.state}")
            if step in progress.closed:
                raise ConflictError(
                    f"refused: the {step.value} step of round {rnd.number} is closed (too late)"
                )
            index = STEPS.index(step)
            if index > 0 and STEPS[index - 1] not in progress.closed:
                raise ConflictError(f"refused: the {step.value} step of round {rnd.number} is not open yet")
            fed = self._server(session, rnd, progress, slot)
            server = fed.server
            if step is SecAggStep.ADVERTISE:
                assert signing_public is not None  # the route's body carries it
                key = _public(signing_public)
            else:
                # The key bound when the node advertised (a node the roster left out has none).
                key = server.signing_key(node_id) or _NOBODY
            if not body.verify(key):
                raise ForbiddenError(
                    f"refused: the {step.value} message of {node_id} is not signed by its round signing key"
                )
            try:
                if isinstance(body, AdvertiseKeys):
                    server.bind_key(node_id, key)
                    server.receive_advertise(body)
                elif isinstance(body, ShareKeys):
                    server.receive_shares(body)
                elif isinstance(body, MaskedInput):
                    server.receive_masked(body, payload or b"")
                elif isinstance(body, UnmaskResponse):
                    server.receive_unmask(body)
                else:  # pragma: no cover - the routes pass only the four message types
                    raise UpdateRejected(f"not a {step.value} message")
            except SecAggError as exc:
                raise UpdateRejected(str(exc)) from exc
            message = body.model_dump(mode="json")
            session.add(
                SecAggMessageRow(
                    round_id=rnd.id,
                    node_id=node_id,
                    step=step.value,
                    body={"signing_public": signing_public, "message": message}
                    if step is SecAggStep.ADVERTISE
                    else message,
                    payload=payload if step is SecAggStep.MASKED else None,
                    received_at=now,
                )
            )
            audit(session, node_id, f"secagg.{step.value}", rnd.id, f"round={rnd.number}")
        return fed, rnd, progress

    def _refused(self, node_id: str, round_id: str, step: SecAggStep, reason: str) -> None:
        with self.db.session() as session:
            audit(session, node_id, "secagg.refused", round_id[:128], f"{step.value}: {reason}"[:2000])
        logger.info("secure aggregation: %s message of node %s refused: %s", step.value, node_id, reason)

    def relay(self, node_id: str, round_id: str, step: SecAggStep) -> SecAggRelay:
        """What the hub hands on after ``step`` closed (``ready`` False while it is open)."""
        return SecAggRelay.model_validate_json(self.relay_json(node_id, round_id, step)[0])

    def relay_json(self, node_id: str, round_id: str, step: SecAggStep) -> tuple[bytes, bool]:
        """``relay`` as its JSON body, and whether it is final (the step closed, or the round cannot finish).

        A closed step's body is serialised once per worker, not per request. Steps that are due close on
        the tick, not here: a waiting node costs a read of the round and of the step's row.
        """
        with self.db.session() as session:
            rnd = self._round(session, round_id, node_id)
            members = session.scalar(_STEP_MEMBERS, {"round_id": rnd.id, "step": step.value})
            failed = rnd.reason if rnd.state == RoundState.FAILED.value else None
            if failed is None and rnd.state != RoundState.COLLECTING.value and members is None:
                failed = f"round {rnd.number} is {rnd.state} before the {step.value} step closed"
            relay = SecAggRelay(
                round_id=rnd.id,
                round=rnd.number,
                step=step,
                ready=False,
                threshold=rnd.threshold,
                failed=failed,
            )
            if members is None or step is SecAggStep.UNMASK:
                return relay.model_dump_json(by_alias=True).encode(), failed is not None
            if node_id not in members:
                raise ForbiddenError(f"this node took no part in the {step.value} step of round {rnd.number}")
            if failed is not None:
                ready = relay.model_copy(update=self._relayed(session, rnd, step, list(members)))
                return ready.model_dump_json(by_alias=True).encode(), True
            with self._relays_lock:
                kept = self._relays.get((rnd.id, step))
            if kept is None:
                # A closed step's relay never changes (its members and their messages are fixed).
                ready = relay.model_copy(update=self._relayed(session, rnd, step, list(members)))
                kept = ready.model_dump_json(by_alias=True).encode()
                with self._relays_lock:
                    self._relays[(rnd.id, step)] = kept
                    while len(self._relays) > _KEPT_RELAYS:
                        self._relays.popitem(last=False)
            return kept, True

    @staticmethod
    def _relayed(session: Session, rnd: _RoundRow, step: SecAggStep, members: list[str]) -> dict[str, Any]:
        update_: dict[str, Any] = {"ready": True}
        if step is SecAggStep.ADVERTISE:
            bodies = _bodies(session, rnd.id)(step, members)
            update_["signing_keys"] = {n: bodies[n][0]["signing_public"] for n in members}
            update_["advertised"] = [AdvertiseKeys.model_validate(bodies[n][0]["message"]) for n in members]
        elif step is SecAggStep.SHARE:
            bodies = _bodies(session, rnd.id)(step, members)
            update_["shares"] = [ShareKeys.model_validate(bodies[n][0]) for n in members]
        else:
            shared = session.scalar(_STEP_MEMBERS, {"round_id": rnd.id, "step": SecAggStep.SHARE.value})
            update_["unmask_request"] = UnmaskRequest(
                task_id=rnd.id,
                round=rnd.number,
                survivors=sorted(members),
                dropped=sorted(set(shared or []) - set(members)),
            )
        return update_

    def _round(self, session: Session, round_id: str, node_id: str) -> _RoundRow:
        rnd = _round_row(session, round_id)
        if rnd is None or node_id not in rnd.nodes:
            # The same answer for "absent" and "not yours": a node learns nothing about other rounds.
            raise NotFoundError(f"no round {round_id!r} for this node")
        if not rnd.secagg:
            raise ConflictError(f"round {rnd.number} does not run secure aggregation")
        return rnd

    # -- time ----------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Close the steps that are due in every collecting round under secure aggregation.

        Then tell the listeners if the rounds or their closed steps are not what this worker knew (another
        worker closed a step, or a round stopped collecting), so that waiting relays look again.
        """
        with self.db.session() as session:
            rounds = [
                round_id
                for round_id, protection in session.execute(
                    select(Round.id, Round.protection).where(Round.state == RoundState.COLLECTING.value)
                )
                if protection and RoundProtection.model_validate(protection).secure_aggregation
            ]
        for round_id in rounds:
            self.advance(round_id)
        with self.db.session() as session:
            counted = session.execute(
                select(SecAggStepRow.round_id, func.count())
                .where(SecAggStepRow.round_id.in_(rounds))
                .group_by(SecAggStepRow.round_id)
            )
            counts = dict.fromkeys(rounds, 0) | {round_id: int(n) for round_id, n in counted}
        with self._known_lock:
            known, self._known = self._known, counts
        if known is None or set(known) != set(counts) or any(n > known[r] for r, n in counts.items()):
            self._changed()

    def _closed_here(self, round_id: str, closed: int) -> None:
        """This worker closed steps of the round (``closed`` of them now): its listeners were told."""
        with self._known_lock:
            if self._known is not None and round_id in self._known:
                self._known[round_id] = max(self._known[round_id], closed)

    def advance(self, round_id: str) -> None:
        """Close every step that is due, in order; fail the round below the threshold; unmask at the end."""
        try:
            changed, finished, closed = self._advance(round_id)
        except IntegrityError:  # another process closed the same step at the same time: its row stands
            self._changed()
            return
        if changed:
            self._closed_here(round_id, closed)
            self._changed()
        if finished:
            self.close_round(round_id)

    def _advance(self, round_id: str) -> tuple[bool, bool, int]:
        """Whether a step closed or the round failed, whether the unmask step closed, and closed steps."""
        now = utcnow()
        step_s = timedelta(seconds=self.settings.secagg_step_s)
        with self.db.session() as session:
            rnd = _round_row(session, round_id)
            if rnd is None or rnd.state != RoundState.COLLECTING.value or not rnd.secagg:
                return False, False, 0
            # Closing steps needs only who sent what: node ids, not message rows (this runs after messages).
            progress = _Progress(session, rnd.id)
            threshold = rnd.threshold
            changed = False
            for index, step in enumerate(STEPS):
                if step in progress.closed:
                    continue
                if index == 0:
                    waiting = set(rnd.nodes) - self._refused_tasks(session, rnd.id)
                    due = rnd.deadline - 3 * step_s
                else:
                    previous = progress.closed[STEPS[index - 1]]
                    waiting = set(previous.members)
                    due = previous.closed_at + step_s
                sent = progress.sent[step]
                if not (waiting <= sent or now >= due):
                    return changed, False, len(progress.closed)
                members = sorted(sent)
                if len(members) < threshold:
                    session.execute(
                        update(Task)
                        .where(Task.round_id == rnd.id, Task.state == TaskState.OPEN.value)
                        .values(state=TaskState.CLOSED.value)
                    )
                    failing = session.get(Round, rnd.id)
                    assert failing is not None  # read above, in this transaction
                    enter_state(
                        session,
                        failing,
                        RoundState.FAILED,
                        f"secure aggregation: {len(members)} nodes sent their {step.value} message; "
                        f"the threshold is {threshold}, so the sum cannot be unmasked",
                    )
                    return True, False, len(progress.closed)
                row = SecAggStepRow(round_id=rnd.id, step=step.value, members=members, closed_at=now)
                progress.closed[step] = _Closed(members, now)
                changed = True
                if step is SecAggStep.UNMASK:
                    # This transaction may hold the database's write lock: never wait for the round's server.
                    with self._servers.hold(rnd.id, wait=False) as slot:
                        total = self._server(session, rnd, progress, slot).server.ring_sum()
                    row.ring_sum = encode_tensors({_RING_SUM: total}, compress=False)
                    survivors = progress.closed[SecAggStep.MASKED].members
                    session.execute(
                        update(Task)
                        .where(Task.round_id == rnd.id, Task.node_id.in_(survivors))
                        .values(state=TaskState.DONE.value, done_at=now)
                    )
                session.add(row)
                audit(session, "hub", f"secagg.{step.value}.closed", rnd.id, f"{len(members)} nodes")
                session.flush()
            return changed, True, len(progress.closed)

    # -- the closer ----------------------------------------------------------------------------------------

    @staticmethod
    def result(session: Session, rnd: Round) -> SecAggSum | None:
        """The round's unmasked sum once the unmask step closed, else None."""
        row = session.get(SecAggStepRow, (rnd.id, SecAggStep.UNMASK.value))
        masked = session.get(SecAggStepRow, (rnd.id, SecAggStep.MASKED.value))
        if row is None or row.ring_sum is None or masked is None:
            return None
        ring = decode_tensors(row.ring_sum)[_RING_SUM]
        total = unflatten(decode_fixed(ring, _FRAC_BITS), _layout(session, rnd.id))
        return SecAggSum(list(masked.members), total)
