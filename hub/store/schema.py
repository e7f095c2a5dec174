"""The hub's tables: nodes, credentials, rounds, tasks, updates, artifacts (models), publications, audit."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Artifact",
    "AuditEntry",
    "Base",
    "Credential",
    "Node",
    "Publication",
    "Round",
    "SecAggMessageRow",
    "SecAggStepRow",
    "Task",
    "UTCDateTime",
    "Update",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive values; they are UTC by construction)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the hub store; use timezone-aware UTC")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class Node(Base):
    """A clinic site. Created ``pending`` with a join code; ``active`` once it enrolled; ``revoked``."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    cohort: Mapped[str] = mapped_column(String(64), default="default")
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    enrolled_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_heartbeat: Mapped[datetime | None]
    edge_version: Mapped[str | None] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    publication_id: Mapped[str | None] = mapped_column(String(64))
    health: Mapped[str | None] = mapped_column(String(32))
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Credential(Base):
    """A secret that authenticates: a one-time join secret or a node's credential. Only its sha256 is kept."""

    __tablename__ = "credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "join" or "node"
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Artifact(Base):
    """A model artifact: npz tensors (round inputs and results) kept in the database, or a bundle file."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "tensors" or "bundle"
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: For bundles: the zip's path relative to the data directory's artifacts folder.
    path: Mapped[str | None] = mapped_column(String(512))
    model_id: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]


class Round(Base):
    __tablename__ = "rounds"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    strategy: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), index=True)
    nodes: Mapped[list[Any]] = mapped_column(default=list)
    min_results: Mapped[int] = mapped_column(Integer)
    deadline: Mapped[datetime]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    reason: Mapped[str | None] = mapped_column(Text)
    model_artifact: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id"))
    result_artifact: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id"))
    #: Who claimed the aggregation and when: a claim older than the lease is taken over after a crash.
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None]
    #: The strategy's state after this round (npz), restored when the next round starts.
    strategy_state: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: The protection stated for the round (``RoundProtection`` as JSON); None: a plain round.
    protection: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("round_id", "node_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), index=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    params_artifact: Mapped[str] = mapped_column(ForeignKey("artifacts.id"))
    expected: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime]
    done_at: Mapped[datetime | None]
    #: Why the node refused the task (its privacy floor's words); None unless refused.
    reason: Mapped[str | None] = mapped_column(Text)


class Update(Base):
    """An accepted update; the unique task id is what makes every accepted update count exactly once."""

    __tablename__ = "updates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), unique=True)
    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), index=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"))
    payload_sha256: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    num_examples: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    received_at: Mapped[datetime]


class Publication(Base):
    __tablename__ = "publications"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    cohort: Mapped[str] = mapped_column(String(64), index=True)
    artifact_id: Mapped[str] = mapped_column(ForeignKey("artifacts.id"))
    #: The SignedPublication as JSON, exactly as served.
    signed: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(80))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)


class SecAggMessageRow(Base):
    """One node's message of one secure-aggregation step; the key makes a second one a replay."""

    __tablename__ = "secagg_messages"

    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    step: Mapped[str] = mapped_column(String(16), primary_key=True)
    #: The signed protocol message (and, for ``advertise``, the signing key it carries) as JSON.
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: The masked vector's npz (``masked`` only): the hub never holds an unmasked update.
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    received_at: Mapped[datetime]


class SecAggStepRow(Base):
    """A closed step of a round's secure aggregation: who took part; after ``unmask``, the ring sum."""

    __tablename__ = "secagg_steps"

    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    step: Mapped[str] = mapped_column(String(16), primary_key=True)
    members: Mapped[list[Any]] = mapped_column(JSON)
    closed_at: Mapped[datetime]
    #: The unmasked sum of the survivors' inputs as ring elements (npz), on the ``unmask`` row only.
    ring_sum: Mapped[bytes | None] = mapped_column(LargeBinary)
