"""RoundCloser: collecting → aggregating → published | failed, at completion, at the deadline, or on cancel.

Aggregation is claimed before it starts; if its process dies, the claim's lease runs out and the next tick
of any process takes the round over. The result is written only by the process that still holds the claim.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, defer

from edge_node.protocol.tensors import encode_tensors
from edge_node.protocol.wire import RoundState, TaskState
from hub.fl.errors import FlError
from hub.fl.strategy import ClientFailure, ClientResult, Params
from hub.rounds.claims import RoundClaims
from hub.rounds.decoded_updates import DecodedUpdates
from hub.rounds.ledger import accepted_count, refused_count
from hub.rounds.lifecycle import TERMINAL, check_transition
from hub.rounds.plan import build_plan
from hub.rounds.reports import round_row
from hub.rounds.round_codec import round_compressor
from hub.rounds.round_updates import stored_update
from hub.rounds.secagg_desk import SUM_CLIENT, SecAggDesk, is_secagg
from hub.rounds.transition import enter_state
from hub.service.audit import audit
from hub.service.errors import ConflictError
from hub.store.artifacts import load_tensors, store_tensors
from hub.store.database import Database
from hub.store.schema import Round, Task, Update, utcnow

__all__ = ["RoundCloser"]


def _close_tasks(session: Session, round_id: str) -> None:
    session.execute(
        update(Task)
        .where(Task.round_id == round_id, Task.state == TaskState.OPEN.value)
        .values(state=TaskState.CLOSED.value)
    )


class RoundCloser:
    """Close rounds; ``issue`` is the opener's, for rounds a dead process left open."""

    def __init__(
        self,
        db: Database,
        claims: RoundClaims,
        issue: Callable[[str], None],
        decoded: DecodedUpdates | None = None,
    ) -> None:
        self.db = db
        self.claims = claims
        self.issue = issue
        self.decoded = decoded if decoded is not None else DecodedUpdates()

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
                    select(Round.id).where(Round.state == RoundState.OPEN.value, self.claims.stale(now))
                )
            )
            stale_agg = list(
                session.scalars(
                    select(Round.id).where(
                        Round.state == RoundState.AGGREGATING.value, self.claims.stale(now)
                    )
                )
            )
        for round_id in stale_open:
            self.issue(round_id)
        for round_id in due + stale_agg:
            self.close_round(round_id)

    def close_round(self, round_id: str) -> None:
        """collecting → aggregating → published | failed, when every node answered or the deadline passed."""
        now = utcnow()
        with self.db.session() as session:
            row = session.get(Round, round_id)
            if row is None:
                return
            if row.state == RoundState.COLLECTING.value and is_secagg(row):
                if not self._secagg_ready(session, row, now):
                    return
            elif row.state == RoundState.COLLECTING.value:
                done = accepted_count(session, round_id)
                refused = refused_count(session, round_id)
                if done + refused < len(row.nodes) and now < row.deadline:
                    return
                if done < row.min_results:
                    if self.claims.claim(session, round_id, RoundState.COLLECTING):
                        session.refresh(row)
                        _close_tasks(session, round_id)
                        enter_state(
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
                if not self.claims.claim(
                    session, round_id, RoundState.COLLECTING, new_state=RoundState.AGGREGATING
                ):
                    return
                _close_tasks(session, round_id)
                audit(session, "hub", "round.aggregating", round_id, f"{done} of {len(row.nodes)} answered")
            elif row.state == RoundState.AGGREGATING.value:
                if not self.claims.claim(session, round_id, RoundState.AGGREGATING):
                    return
            else:
                return
        self._aggregate(round_id)

    def _secagg_ready(self, session: Session, row: Round, now: datetime) -> bool:
        """A round under secure aggregation aggregates once its sum is unmasked; at the deadline without
        it, the round fails with the step that was still open."""
        if SecAggDesk.result(session, row) is not None:
            check_transition(RoundState.COLLECTING, RoundState.AGGREGATING)
            aggregating = RoundState.AGGREGATING
            if not self.claims.claim(session, row.id, RoundState.COLLECTING, new_state=aggregating):
                return False
            _close_tasks(session, row.id)
            audit(session, "hub", "round.aggregating", row.id, "secure aggregation unmasked the sum")
            return True
        if now < row.deadline:
            return False
        if self.claims.claim(session, row.id, RoundState.COLLECTING):
            session.refresh(row)
            _close_tasks(session, row.id)
            enter_state(
                session, row, RoundState.FAILED, "deadline passed before secure aggregation unmasked the sum"
            )
            row.claimed_by = None
        return False

    def _aggregate(self, round_id: str) -> None:
        with self.db.session() as session:
            row = session.get(Round, round_id)
            assert row is not None
            start = load_tensors(session, row.model_artifact) if row.model_artifact else {}
            number, strategy, config, nodes = row.number, row.strategy, dict(row.config), list(row.nodes)
            kept = self.decoded.take(round_id)
            compressor = round_compressor(row.protection)
            results = []
            secagg = SecAggDesk.result(session, row) if is_secagg(row) else None
            if secagg is not None:
                # The strategy sees one result: the survivors' mean, never a single node's update.
                results.append(ClientResult(SUM_CLIENT, number, len(secagg.survivors), secagg.mean(), {}))
            # The payload column is read only for updates this process did not decode when it took them.
            for u in session.scalars(
                select(Update)
                .options(defer(Update.payload))
                .where(Update.round_id == round_id)
                .order_by(Update.node_id)
            ):
                entry = kept.get(u.node_id)
                if entry and entry[0] == u.payload_sha256:
                    tensors = entry[1]
                else:  # accepted by another process (or before a restart): decoded as the intake did
                    tensors = stored_update(session, u, compressor)
                results.append(ClientResult(u.node_id, number, int(u.num_examples), tensors, dict(u.metrics)))
            refusals = {
                t.node_id: t.reason or "refused"
                for t in session.scalars(
                    select(Task).where(Task.round_id == round_id, Task.state == TaskState.REFUSED.value)
                )
            }
        answered = {r.client_id for r in results}
        if secagg is not None:
            # The strategy's round has one client, the sum: what it was asked for is what it gets.
            nodes = [SUM_CLIENT]
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
            if row.state != RoundState.AGGREGATING.value or row.claimed_by != self.claims.instance:
                return  # another process took over after our lease ran out; it will finish the round
            if new is None:
                enter_state(session, row, RoundState.FAILED, reason)
            else:
                row.result_artifact = store_tensors(session, new, note=f"round {number} {strategy}")
                row.strategy_state = encode_tensors(state, compress=False) if state else None
                enter_state(session, row, RoundState.PUBLISHED, f"aggregated {len(results)} updates")
            row.claimed_by = None
            row.claimed_at = None

    def cancel(self, round_id: str, *, actor: str) -> None:
        with self.db.session() as session:
            row = round_row(session, round_id)
            if RoundState(row.state) in TERMINAL or row.state == RoundState.AGGREGATING.value:
                raise ConflictError(
                    f"round {row.number} is {row.state}; only open or collecting rounds can be cancelled"
                )
            _close_tasks(session, row.id)
            enter_state(session, row, RoundState.FAILED, f"cancelled by {actor}")
