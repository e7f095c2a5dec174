"""RoundOpener: a new round is persisted (open), then its tasks are written, one per node (collecting)."""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edge_node.protocol.tensors import decode_tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import NodeState, RoundProtection, RoundStart, RoundState, TaskState
from hub.fl.errors import FlError
from hub.fl.strategy import Params
from hub.rounds.claims import RoundClaims
from hub.rounds.plan import COLLECTIONS, build_plan
from hub.rounds.secagg_desk import secagg_threshold
from hub.rounds.tensor_specs import expected_json
from hub.rounds.transition import enter_state
from hub.service.audit import audit
from hub.service.errors import ConflictError, RoundConfigError
from hub.store.artifacts import load_tensors, store_tensors
from hub.store.database import Database
from hub.store.schema import Node, Round, Task, utcnow

__all__ = ["RoundOpener"]

logger = logging.getLogger(__name__)


def _content_key(params: Params) -> bytes:
    """A digest of named tensors' names, dtypes, shapes and bytes: equal tensors, equal keys."""
    digest = hashlib.sha256()
    for name in sorted(params):
        arr = np.asarray(params[name])
        digest.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        digest.update(arr.tobytes())
    return digest.digest()


class RoundOpener:
    """Create rounds and issue their tasks; issuing is idempotent, so a crashed process's work is redone."""

    def __init__(self, db: Database, claims: RoundClaims) -> None:
        self.db = db
        self.claims = claims

    def open(self, request: RoundStart, *, actor: str) -> str:
        """Persist a new round (open), then issue its tasks (collecting); returns the round id."""
        for _attempt in range(5):
            try:
                round_id = self._create(request, actor)
                break
            except IntegrityError:  # another process took the same round number: take the next one
                continue
        else:
            raise ConflictError("could not allocate a round number; retry")
        self.issue(round_id)
        return round_id

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
            if (
                request.config.get("robust") == "audited"
                and request.protection
                and request.protection.clip_norm
            ):
                raise RoundConfigError(
                    "robust=audited reads how long each update is for the images its node claims, and a clip "
                    "at the nodes makes a long honest update read short: start it without --clip, or with "
                    "another robust reduction"
                )
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
                claimed_by=self.claims.instance,
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
        if kind in (UpdateKind.ENVELOPE_MOMENTS, UpdateKind.ENVELOPE_DISTANCES):
            raise RoundConfigError(
                "protection: an envelope round's sums and counts take no clipping, noise, compression or "
                "secure aggregation (they would no longer fit the envelope); each sum a node sends covers at "
                "least 10 of its images: start it without protection options"
            )
        if kind is UpdateKind.KEPT_TENSORS:
            raise RoundConfigError(
                "protection: a kept_tensors round collects each node's own tensors to deploy them (the hub "
                "needs every node's copy, not their sum, and clipped or noised statistics would no longer "
                "normalise its images): start it without protection options; a clinic whose privacy floor "
                "leaves kept_tensors out of allowed_kinds refuses it"
            )
        try:
            protection.spec(kind, cohort)
        except ValueError as exc:
            raise RoundConfigError(f"protection: {exc}") from exc
        if protection.secure_aggregation:
            threshold = secagg_threshold(protection.secagg_threshold, cohort)
            if cohort < 2 or threshold < 2:
                raise RoundConfigError(
                    f"protection: secure aggregation needs at least 2 nodes and a threshold of at least 2 "
                    f"(cohort {cohort}, threshold {threshold}): a sum of one update is that update"
                )
            if kind is UpdateKind.STATS:
                raise RoundConfigError(
                    "protection: secure aggregation sums float tensors in a ring; a stats round's counts are "
                    "integers: start it without --secagg"
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

    def issue(self, round_id: str) -> None:
        """open → collecting: write one task per node (idempotent if a crashed process began it)."""
        with self.db.session() as session:
            if not self.claims.claim(session, round_id, RoundState.OPEN):
                return
            row = session.get(Round, round_id)
            assert row is not None  # claimed just above
            start = load_tensors(session, row.model_artifact) if row.model_artifact else {}
            plan = build_plan(row.strategy, row.config, start, row.nodes)
            have = set(session.scalars(select(Task.node_id).where(Task.round_id == round_id)))
            now = utcnow()
            # Most strategies hand every node the same tensors (each its own copy): encode them once per
            # content, not once per node; hashing the raw arrays costs a fraction of encoding them.
            stored: dict[bytes, str] = {}
            for planned in plan.tasks(row.number, row.nodes):
                if planned.node_id in have:
                    continue
                content = _content_key(planned.params)
                if content not in stored:
                    stored[content] = store_tensors(session, planned.params)
                session.add(
                    Task(
                        id="t-" + secrets.token_hex(8),
                        round_id=round_id,
                        node_id=planned.node_id,
                        state=TaskState.OPEN.value,
                        config=dict(planned.config),
                        params_artifact=stored[content],
                        expected=expected_json(planned.expected),
                        created_at=now,
                        done_at=None,
                    )
                )
            row.kind = plan.kind.value
            row.claimed_by = None
            row.claimed_at = None
            enter_state(session, row, RoundState.COLLECTING, None)
