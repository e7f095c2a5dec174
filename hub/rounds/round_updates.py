"""A training round's updates as the hub holds them, node by node: ``fedclinic-hub rounds updates`` and
``GET /v1/admin/rounds/{round_id}/updates``.

Each accepted update is decoded from the store as the aggregation decodes it (compressed rounds back to
their dense update), with the images its node says it trained on, and read against the others'
(``hub.fl.update_audit``); the report adds what the operator should look at (``warnings``). Collection
rounds (statistics, public logits, the envelope's sums) hold answers that are not model updates, and a
round under secure aggregation holds masked inputs whose only readable form is their sum: both are
refused, saying so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from edge_node.protocol.compression import Compressor
from edge_node.protocol.tensors import decode_tensors
from edge_node.protocol.updates import UpdateKind
from edge_node.protocol.wire import NodeUpdateInfo, RoundState, RoundUpdatesInfo
from hub.fl.errors import FlError
from hub.fl.robust import NORM_FILTERS
from hub.fl.strategy import Params
from hub.fl.update_audit import MIN_NODES, NodeUpdate, UpdateAudit, audit_updates
from hub.rounds.reports import round_row
from hub.rounds.round_codec import dense_update, round_compressor
from hub.rounds.secagg_desk import is_secagg
from hub.rounds.task_desk import round_protection
from hub.rounds.tensor_specs import expected_specs
from hub.service.errors import ConflictError
from hub.store.database import Database
from hub.store.schema import Node, Task, Update

__all__ = ["MODEL_UPDATES", "RoundUpdates", "read_round_updates", "round_updates_report", "stored_update"]

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
    kind: UpdateKind
    state: RoundState
    #: The robust reduction the round aggregates with (``--config robust=…``), if any.
    robust: str | None
    #: Node id → its name at enrollment.
    names: dict[str, str]
    audit: UpdateAudit
    #: The clip norm and per-round ε the round asked of every node (None: not asked).
    clip_norm: float | None = None
    epsilon: float | None = None


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
        kind = UpdateKind(row.kind)
        round_id = row.id
        protection = round_protection(row) if row.protection else None
    try:
        audit = audit_updates(updates)
    except FlError as exc:
        raise ConflictError(f"round {number}'s updates cannot be read together: {exc}") from exc
    return RoundUpdates(
        round_id=round_id,
        number=number,
        strategy=strategy,
        kind=kind,
        state=state,
        robust=str(robust) if robust is not None else None,
        names=names,
        audit=audit,
        clip_norm=protection.clip_norm if protection else None,
        epsilon=protection.epsilon if protection else None,
    )


def _warnings(read: RoundUpdates) -> list[str]:
    """What the operator should look at before the next round starts from this one."""

    def who(node_id: str) -> str:
        return f"node {read.names.get(node_id, node_id)} ({node_id})"

    audit = read.audit
    left_out = {n.node_id for n in audit.left_out(sizes=_sizes(read))} if read.robust == "audited" else set()
    out = []
    if read.kind is not UpdateKind.WEIGHTS_DELTA:
        out.append(
            f"a {read.kind.value} round: the reading names nobody here; on the benchmark its rules named "
            "honest clinics' head updates in 24 of 216 clinic-rounds, most as too long for their size, since "
            "the light learner trains every head for as many epochs (docs/benchmarks.md); the figures are a "
            "description"
        )
    for node, reason in _named(read):
        dropped = "the round's audited mean left it out; " if node.node_id in left_out else ""
        out.append(
            f"{who(node.node_id)}: {reason}: a broken or hostile node, or a clinic unlike every other; "
            f"{dropped}leave it out of the next round (`fedclinic-hub rounds start … --exclude-node "
            f"{node.node_id}`) to compare"
        )
    if read.robust in NORM_FILTERS:
        out += [
            f"the round's norm filter left out {who(n.node_id)}: its update is {n.norm_ratio or 0:.1f}× the "
            "median norm (a large clinic's honest update can be this long)"
            for n in audit.dropped()
        ]
    if read.epsilon is not None:
        out.append(
            f"every node clipped its update at {read.clip_norm:g} and added noise (ε {read.epsilon:g} per "
            "round): the reading compares noisy updates and was measured on the benchmark without noise; it "
            "names nobody for the length of an update (a clipped long update reads short for its size)"
        )
    elif read.clip_norm is not None:
        out.append(
            f"every node clipped its update at {read.clip_norm:g}: it names nobody for the length of an "
            "update (a clipped long update reads short for its size), and was measured on the benchmark "
            "without a clip"
        )
    if len(audit.nodes) < MIN_NODES:
        out.append(
            f"with {len(audit.nodes)} node(s) the reading names nobody: it cannot tell which of them is off"
        )
    return out


def _sizes(read: RoundUpdates) -> bool:
    """Whether the length rules apply: not where the nodes clipped their updates."""
    return read.clip_norm is None


def _named(read: RoundUpdates) -> list[tuple[NodeUpdate, str]]:
    """The nodes the reading names: only in the rounds it was measured on (``weights_delta``), and by the
    length rules only in rounds without a clip at the nodes."""
    return read.audit.named(sizes=_sizes(read)) if read.kind is UpdateKind.WEIGHTS_DELTA else []


def round_updates_report(db: Database, round_ref: str) -> RoundUpdatesInfo:
    """``read_round_updates`` as the wire report the CLI and the admin API give."""
    read = read_round_updates(db, round_ref)
    named = dict((n.node_id, reason) for n, reason in _named(read))
    return RoundUpdatesInfo(
        round_id=read.round_id,
        round=read.number,
        strategy=read.strategy,
        state=read.state,
        robust=read.robust,
        norm_filter_factor=read.audit.factor,
        nodes=[
            NodeUpdateInfo(
                name=read.names.get(n.node_id), named=named.get(n.node_id), **dataclasses.asdict(n)
            )
            for n in read.audit.nodes
        ],
        warnings=_warnings(read),
    )
