"""RoundClaims: which process holds a round's work, as a lease on the round row that only one process wins.

Work that a dead process had claimed (issuing tasks, aggregating) carries a ``claimed_at`` time; after the
lease it is taken over by whichever process ticks next. Every claim is a conditional UPDATE, so several API
workers over one database never both win it.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, update
from sqlalchemy.orm import Session

from edge_node.protocol.wire import RoundState
from hub.store.schema import Round, utcnow

__all__ = ["RoundClaims", "process_instance"]


def process_instance() -> str:
    """A name for this process that no other process shares, even on another host."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RoundClaims:
    instance: str
    lease: timedelta

    def claim(
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

    def stale(self, now: datetime) -> ColumnElement[bool]:
        """The condition "nobody holds a live claim" for a query over rounds at time ``now``."""
        return or_(Round.claimed_at.is_(None), Round.claimed_at < now - self.lease)
