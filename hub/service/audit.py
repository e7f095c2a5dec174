"""The audit log: who did what to which node, round or publication (never PHI; nodes send none)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from hub.store.schema import AuditEntry, utcnow

__all__ = ["audit"]


def audit(session: Session, actor: str, action: str, subject: str | None, detail: str | None) -> None:
    """Add an entry to the caller's transaction: it is kept exactly when the change it describes is."""
    session.add(AuditEntry(at=utcnow(), actor=actor, action=action, subject=subject, detail=detail))
