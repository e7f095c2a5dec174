"""A training round's updates as the hub holds them, node by node, for ``fedclinic-hub rounds updates``.

Each accepted update is decoded from the store as the aggregation decodes it (compressed rounds back to
their dense update), with the images its node says it trained on, and read against the others'
(``hub.fl.update_audit``). Collection rounds (statistics, public logits, the envelope's sums) hold answers
that are not model updates, and a round under secure aggregation holds masked inputs whose only readable
form is their sum: both are refused, saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from edge_node.protocol.compression import Compressor
from edge_node.protocol.tensors import decode_tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import RoundState
from hub.fl.errors import FlError
from hub.fl.strategy import Params
from hub.fl.update_audit import UpdateAudit, audit_updates
from hub.rounds.reports import round_row
from hub.rounds.round_codec import dense_update, round_compressor
from hub.rounds.secagg_desk import is_secagg
from hub.rounds.tensor_specs import expected_specs
from hub.service.errors import ConflictError
from hub.store.database import Database
from hub.store.schema import Node, Task, Update

__all__ = ["MODEL_UPDATES", "RoundUpdates", "read_round_updates", "stored_update"]

#: The kinds of round whose answers are model updates.
MODEL_UPDATES = (UpdateKind.WEIGHTS_DELTA, UpdateKind.HEAD_DELTA)


def stored_update(session: Session, u: Update, compressor: Compressor | None) -> Params:
    """The dense update an accepted ``Update`` row holds, decoded with its round's codec (``compressor``,
    ``round_compressor`` of the round's protection)."""
    wire = decode_tensors(u.payload)
    if compressor is None:
        return wire
    task = session.get(Task, u.task_id)
    assert task is not None  # foreign key
    return dense_update(compressor, wire, expected_specs(task.expected))


@dataclass(frozen=True)
class RoundUpdates:
    """One round's updates read node by node, with what the operator needs to act on the reading."""

    round_id: str
    number: int
    strategy: str
    state: RoundState
    #: The robust reduction the round aggregates with (``--config robust=…``), if any.
    robust: str | None
    #: Node id → its name at enrollment.
    names: dict[str, str]
    audit: UpdateAudit


def read_round_updates(db: Database, round_ref: str) -> RoundUpdates:
    """Every accepted update of a training round, read against the others'.

    Raises NotFoundError for no such round, and ConflictError for a collection round, a round under secure
    aggregation, one no node has answered yet, or updates that cannot be read together.
    """
    with db.session() as session:
        row = round_row(session, round_ref)
        if UpdateKind(row.kind) not in MODEL_UPDATES:
            raise ConflictError(
                f"round {row.number} collects {row.kind} answers, not model updates: there is nothing to "
                "read node by node here (`fedclinic-hub envelope build` reads the envelope rounds' answers)"
            )
        if is_secagg(row):
            raise ConflictError(
                f"round {row.number} used secure aggregation: the hub holds masked inputs, and only their "
                "sum can be read"
            )
        rows = list(session.scalars(select(Update).where(Update.round_id == row.id).order_by(Update.node_id)))
        if not rows:
            raise ConflictError(f"no node has answered round {row.number} yet")
        compressor = round_compressor(row.protection)
        updates = {u.node_id: (stored_update(session, u, compressor), int(u.num_examples)) for u in rows}
        names = {n.id: n.name for n in session.scalars(select(Node).where(Node.id.in_(sorted(updates))))}
        robust = row.config.get("robust")
        number, strategy, state = row.number, row.strategy, RoundState(row.state)
        round_id = row.id
    try:
        audit = audit_updates(updates)
    except FlError as exc:
        raise ConflictError(f"round {number}'s updates cannot be read together: {exc}") from exc
    return RoundUpdates(
        round_id=round_id,
        number=number,
        strategy=strategy,
        state=state,
        robust=str(robust) if robust is not None else None,
        names=names,
        audit=audit,
    )
