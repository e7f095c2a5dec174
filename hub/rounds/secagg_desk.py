"""SecAggDesk: a round's secure aggregation over the API: each step's messages, step closing, the sum.

The hub is the protocol's relay. Each node message is kept as one row keyed by (round, node, step), so a
second message of a step is a replay and is refused; each closed step is a row that fixes who took part.
Every message is checked, before it is kept, by a ``SecAggServer`` fed the stored rows (signature, binding
to the round, membership of the previous step), so several API processes agree without shared memory; each
worker keeps that server between requests and feeds it only the rows it lacks (``SecAggServers``).

A step closes when every node of the previous step has sent its message, or ``secagg_step_s`` after the
previous step closed (the first step: that long three times before the round's deadline, the time the
later steps need). A step that closes with fewer than the threshold's nodes fails the round with the
reason. When the unmask step closes, the sum of the survivors' inputs is rebuilt and kept (ring elements):
the hub only ever stores masked vectors and that sum.

Nodes sign with an Ed25519 key made for the round and sent with ``AdvertiseKeys``; the hub binds it to the
node's API credential (the request's sender). The trust model is an honest-but-curious hub: nodes take
the peers' signing keys from the hub's roster (see docs/hub-service.md).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from edge_node.protocol.errors import SecAggError
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
from edge_node.protocol.wire import RoundState, TaskState
from hub.fl.secagg import SecAggServer
from hub.fl.strategy import Params
from hub.fl.validation import TensorSpec
from hub.rounds.secagg_servers import FedServer, SecAggServers, ServerSlot
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


def secagg_threshold(protection_threshold: int | None, cohort: int) -> int:
    """The stated t, else the smallest strict two-thirds majority of the cohort (at least 2)."""
    if protection_threshold is not None:
        return protection_threshold
    return min(cohort, max(2, (2 * cohort) // 3 + 1))


def _threshold(rnd: Round) -> int:
    return secagg_threshold(round_protection(rnd).secagg_threshold, len(rnd.nodes))


class SecAggSum:
    """A round's unmasked result: the survivors and the float sum of their inputs in the task's layout."""

    def __init__(self, survivors: list[str], total: Params) -> None:
        self.survivors = survivors
        self.total = total

    def mean(self) -> Params:
        """The unweighted mean of the survivors' inputs (every node counts once, as FedAvg over nodes)."""
        k = len(self.survivors)
        return {name: (arr.astype(np.float64) / k).astype(arr.dtype) for name, arr in self.total.items()}


def _layout(session: Session, rnd: Round) -> dict[str, TensorSpec]:
    task = session.scalars(select(Task).where(Task.round_id == rnd.id).limit(1)).one()
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


class _Stored:
    """The rows of one round's secure aggregation as they stand."""

    def __init__(self, session: Session, rnd: Round) -> None:
        # Closed steps first: a step's row is written after its messages, so they are all found below. A
        # message that raced the closing of its step is not part of it and is left out.
        self.closed: dict[SecAggStep, SecAggStepRow] = {
            SecAggStep(r.step): r
            for r in session.scalars(select(SecAggStepRow).where(SecAggStepRow.round_id == rnd.id))
        }
        self.messages: dict[SecAggStep, dict[str, SecAggMessageRow]] = {s: {} for s in STEPS}
        # Payloads (masked vectors) are read only when the sum is rebuilt, not on every request.
        rows = session.scalars(
            select(SecAggMessageRow)
            .options(defer(SecAggMessageRow.payload))
            .where(SecAggMessageRow.round_id == rnd.id)
        )
        for row in rows:
            step = SecAggStep(row.step)
            closed = self.closed.get(step)
            if closed is None or row.node_id in closed.members:
                self.messages[step][row.node_id] = row

    def signing_keys(self) -> dict[str, str]:
        return {n: r.body["signing_public"] for n, r in self.messages[SecAggStep.ADVERTISE].items()}


class SecAggDesk:
    """Take nodes' protocol messages, relay closed steps, close steps on time; ``close_round`` at the end."""

    def __init__(self, db: Database, settings: HubSettings, close_round: Callable[[str], None]) -> None:
        self.db = db
        self.settings = settings
        self.close_round = close_round
        self._servers = SecAggServers()
        self._relays: OrderedDict[tuple[str, SecAggStep], tuple[SecAggRelay, bytes]] = OrderedDict()
        self._relays_lock = threading.Lock()

    def _server(self, session: Session, rnd: Round, stored: _Stored, slot: ServerSlot) -> FedServer:
        """The slot's server of the round (taken out of it) fed every stored (checked) row, else a new one."""
        fed, slot.fed = slot.fed, None
        if fed is not None:
            try:
                if fed.catch_up(session, rnd.id, stored.messages, stored.closed, _public):
                    return fed
            except SecAggError:  # it disagrees with the store: the store is the truth
                pass
        fed = FedServer(
            SecAggServer(
                task_id=rnd.id,
                round=rnd.number,
                node_keys={n: _NOBODY for n in rnd.nodes},
                threshold=_threshold(rnd),
                layout=_layout(session, rnd),
                frac_bits=_FRAC_BITS,
            )
        )
        fed.catch_up(session, rnd.id, stored.messages, stored.closed, _public)
        return fed

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
        self.advance(round_id)  # a step that is due closes first, so a late message is refused as such
        try:
            with self._servers.hold(round_id) as slot:
                fed = self._keep(node_id, round_id, step, body, signing_public, payload, slot)
                # Kept only now that the message is committed: the server then matches the store.
                fed.fed[step].add(node_id)
                slot.fed = fed
        except IntegrityError:  # the same message raced itself in two requests: the second is a replay
            self._refused(node_id, round_id, step, "a second message for this step (replay)")
            reason = f"refused: {node_id} already sent its {step.value} message (replay)"
            raise ConflictError(reason) from None
        except HubServiceError as exc:
            self._refused(node_id, round_id, step, str(exc))
            raise
        self.advance(round_id)
        return SecAggReceipt(round_id=round_id, node_id=node_id, step=step)

    def _keep(
        self,
        node_id: str,
        round_id: str,
        step: SecAggStep,
        body: SecAggMessage,
        signing_public: str | None,
        payload: bytes | None,
        slot: ServerSlot,
    ) -> FedServer:
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
            stored = _Stored(session, rnd)
            if node_id in stored.messages[step]:
                raise ConflictError(f"refused: {node_id} already sent its {step.value} message (replay)")
            if rnd.state != RoundState.COLLECTING.value:
                raise ConflictError(f"refused: round {rnd.number} is {rnd.state}")
            if step in stored.closed:
                raise ConflictError(
                    f"refused: the {step.value} step of round {rnd.number} is closed (too late)"
                )
            index = STEPS.index(step)
            if index > 0 and STEPS[index - 1] not in stored.closed:
                raise ConflictError(f"refused: the {step.value} step of round {rnd.number} is not open yet")
            if step is SecAggStep.ADVERTISE:
                assert signing_public is not None  # the route's body carries it
                key = _public(signing_public)
            else:
                known = stored.signing_keys().get(node_id)
                key = _public(known) if known is not None else _NOBODY
            if not body.verify(key):
                raise ForbiddenError(
                    f"refused: the {step.value} message of {node_id} is not signed by its round signing key"
                )
            fed = self._server(session, rnd, stored, slot)
            server = fed.server
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
                    received_at=utcnow(),
                )
            )
            audit(session, node_id, f"secagg.{step.value}", rnd.id, f"round={rnd.number}")
        return fed

    def _refused(self, node_id: str, round_id: str, step: SecAggStep, reason: str) -> None:
        with self.db.session() as session:
            audit(session, node_id, "secagg.refused", round_id[:128], f"{step.value}: {reason}"[:2000])
        logger.info("secure aggregation: %s message of node %s refused: %s", step.value, node_id, reason)

    def relay(self, node_id: str, round_id: str, step: SecAggStep) -> SecAggRelay:
        """What the hub hands on after ``step`` closed (``ready`` False while it is open)."""
        return self._relay(node_id, round_id, step)[0]

    def relay_json(self, node_id: str, round_id: str, step: SecAggStep) -> bytes:
        """``relay`` as its JSON body; a closed step's body is serialised once per worker, not per request."""
        relay, body = self._relay(node_id, round_id, step)
        return body if body is not None else relay.model_dump_json(by_alias=True).encode()

    def _relay(self, node_id: str, round_id: str, step: SecAggStep) -> tuple[SecAggRelay, bytes | None]:
        self.advance(round_id)
        with self.db.session() as session:
            rnd = self._round(session, round_id, node_id)
            failed = rnd.reason if rnd.state == RoundState.FAILED.value else None
            relay = SecAggRelay(
                round_id=rnd.id,
                round=rnd.number,
                step=step,
                ready=False,
                threshold=_threshold(rnd),
                failed=failed,
            )
            closed = session.get(SecAggStepRow, (rnd.id, step.value))
            if closed is None or step is SecAggStep.UNMASK:
                return relay, None
            if node_id not in closed.members:
                raise ForbiddenError(f"this node took no part in the {step.value} step of round {rnd.number}")
            with self._relays_lock:
                kept = self._relays.get((rnd.id, step))
            if kept is None:
                # A closed step's relay never changes (its members and their messages are fixed).
                ready = relay.model_copy(update=self._relayed(session, rnd, step, list(closed.members)))
                kept = (ready, ready.model_dump_json(by_alias=True).encode())
                with self._relays_lock:
                    self._relays[(rnd.id, step)] = kept
                    while len(self._relays) > _KEPT_RELAYS:
                        self._relays.popitem(last=False)
            if failed is not None:
                return kept[0].model_copy(update={"failed": failed}), None
            return kept

    @staticmethod
    def _relayed(session: Session, rnd: Round, step: SecAggStep, members: list[str]) -> dict[str, Any]:
        stored = _Stored(session, rnd)
        update_: dict[str, Any] = {"ready": True}
        if step is SecAggStep.ADVERTISE:
            keys = stored.signing_keys()
            update_["signing_keys"] = {n: keys[n] for n in members}
            update_["advertised"] = [
                AdvertiseKeys.model_validate(stored.messages[step][n].body["message"]) for n in members
            ]
        elif step is SecAggStep.SHARE:
            update_["shares"] = [ShareKeys.model_validate(stored.messages[step][n].body) for n in members]
        else:
            shared = stored.closed[SecAggStep.SHARE].members
            update_["unmask_request"] = UnmaskRequest(
                task_id=rnd.id,
                round=rnd.number,
                survivors=sorted(members),
                dropped=sorted(set(shared) - set(members)),
            )
        return update_

    def _round(self, session: Session, round_id: str, node_id: str) -> Round:
        rnd = session.get(Round, round_id)
        if rnd is None or node_id not in rnd.nodes:
            # The same answer for "absent" and "not yours": a node learns nothing about other rounds.
            raise NotFoundError(f"no round {round_id!r} for this node")
        if not is_secagg(rnd):
            raise ConflictError(f"round {rnd.number} does not run secure aggregation")
        return rnd

    # -- time ----------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Close the steps that are due in every collecting round under secure aggregation."""
        with self.db.session() as session:
            rounds = [
                r.id
                for r in session.scalars(select(Round).where(Round.state == RoundState.COLLECTING.value))
                if is_secagg(r)
            ]
        for round_id in rounds:
            self.advance(round_id)

    def advance(self, round_id: str) -> None:
        """Close every step that is due, in order; fail the round below the threshold; unmask at the end."""
        try:
            finished = self._advance(round_id)
        except IntegrityError:  # another process closed the same step at the same time: its row stands
            return
        if finished:
            self.close_round(round_id)

    def _advance(self, round_id: str) -> bool:
        now = utcnow()
        step_s = timedelta(seconds=self.settings.secagg_step_s)
        with self.db.session() as session:
            rnd = session.get(Round, round_id)
            if rnd is None or rnd.state != RoundState.COLLECTING.value or not is_secagg(rnd):
                return False
            # Closing steps needs only who sent what: node ids, not message rows (this runs on every request).
            closed: dict[SecAggStep, SecAggStepRow] = {
                SecAggStep(r.step): r
                for r in session.scalars(select(SecAggStepRow).where(SecAggStepRow.round_id == rnd.id))
            }
            sent_by: dict[SecAggStep, set[str]] = {s: set() for s in STEPS}
            for step_value, sender in session.execute(
                select(SecAggMessageRow.step, SecAggMessageRow.node_id).where(
                    SecAggMessageRow.round_id == rnd.id
                )
            ):
                sent_by[SecAggStep(step_value)].add(sender)
            threshold = _threshold(rnd)
            for index, step in enumerate(STEPS):
                if step in closed:
                    continue
                if index == 0:
                    refused = set(
                        session.scalars(
                            select(Task.node_id).where(
                                Task.round_id == rnd.id, Task.state == TaskState.REFUSED.value
                            )
                        )
                    )
                    waiting = set(rnd.nodes) - refused
                    due = rnd.deadline - 3 * step_s
                else:
                    previous = closed[STEPS[index - 1]]
                    waiting = set(previous.members)
                    due = previous.closed_at + step_s
                sent = sent_by[step]
                if not (waiting <= sent or now >= due):
                    return False
                members = sorted(sent)
                if len(members) < threshold:
                    session.execute(
                        update(Task)
                        .where(Task.round_id == rnd.id, Task.state == TaskState.OPEN.value)
                        .values(state=TaskState.CLOSED.value)
                    )
                    enter_state(
                        session,
                        rnd,
                        RoundState.FAILED,
                        f"secure aggregation: {len(members)} nodes sent their {step.value} message; "
                        f"the threshold is {threshold}, so the sum cannot be unmasked",
                    )
                    return False
                row = SecAggStepRow(round_id=rnd.id, step=step.value, members=members, closed_at=now)
                closed[step] = row
                if step is SecAggStep.UNMASK:
                    stored = _Stored(session, rnd)
                    stored.closed[step] = row
                    # This transaction may hold the database's write lock: never wait for the round's server.
                    with self._servers.hold(rnd.id, wait=False) as slot:
                        total = self._server(session, rnd, stored, slot).server.ring_sum()
                    row.ring_sum = encode_tensors({_RING_SUM: total}, compress=False)
                    survivors = closed[SecAggStep.MASKED].members
                    session.execute(
                        update(Task)
                        .where(Task.round_id == rnd.id, Task.node_id.in_(survivors))
                        .values(state=TaskState.DONE.value, done_at=now)
                    )
                session.add(row)
                audit(session, "hub", f"secagg.{step.value}.closed", rnd.id, f"{len(members)} nodes")
                session.flush()
            return True

    # -- the closer ----------------------------------------------------------------------------------------

    @staticmethod
    def result(session: Session, rnd: Round) -> SecAggSum | None:
        """The round's unmasked sum once the unmask step closed, else None."""
        row = session.get(SecAggStepRow, (rnd.id, SecAggStep.UNMASK.value))
        masked = session.get(SecAggStepRow, (rnd.id, SecAggStep.MASKED.value))
        if row is None or row.ring_sum is None or masked is None:
            return None
        ring = decode_tensors(row.ring_sum)[_RING_SUM]
        total = unflatten(decode_fixed(ring, _FRAC_BITS), _layout(session, rnd))
        return SecAggSum(list(masked.members), total)
