"""Persisting a round's state change: checked against the life-cycle table, audited and logged."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from edge_node.protocol.wire import RoundState
from hub.rounds.lifecycle import check_transition
from hub.service.audit import audit
from hub.store.schema import Round, utcnow

__all__ = ["enter_state"]

logger = logging.getLogger(__name__)


def enter_state(session: Session, row: Round, target: RoundState, reason: str | None) -> None:
    check_transition(RoundState(row.state), target)
    row.state = target.value
    row.updated_at = utcnow()
    row.reason = reason
    audit(session, "hub", f"round.{target.value}", row.id, reason)
    logger.info("round %d: %s%s", row.number, target.value, f" ({reason})" if reason else "")
