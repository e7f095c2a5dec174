"""The hub's state in SQL (SQLAlchemy 2 + Alembic): SQLite by default, PostgreSQL in production."""

from hub.store.database import Database, open_database
from hub.store.schema import (
    Artifact,
    AuditEntry,
    Base,
    Credential,
    Node,
    Publication,
    Round,
    Task,
    Update,
)

__all__ = [
    "Artifact",
    "AuditEntry",
    "Base",
    "Credential",
    "Database",
    "Node",
    "Publication",
    "Round",
    "Task",
    "Update",
    "open_database",
]
