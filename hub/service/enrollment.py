"""Sites joining and leaving: one-time join codes, node credentials (stored as sha256), rotation, revocation.

Adding or revoking a site touches only that site's rows: no shared secret is ever reissued.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from edge_node.protocol.wire import (
    WIRE_VERSION,
    EnrollRequest,
    JoinCode,
    NodeInfo,
    NodeState,
    encode_join_code,
)
from hub.service.audit import audit
from hub.service.errors import AuthError, ConflictError, JoinCodeRefused, NotFoundError, RevokedError
from hub.service.heartbeat import envelope_counts
from hub.store.schema import Credential, Node, utcnow

__all__ = [
    "authenticate_node",
    "enroll_node",
    "issue_join_code",
    "listed_nodes",
    "node_info",
    "revoke_node",
    "rotate_credential",
    "secret_digest",
]

logger = logging.getLogger(__name__)


def secret_digest(secret: str) -> str:
    """What the hub keeps of a secret: its sha256 (secrets are 256-bit random, so no slow hash is needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def node_info(node: Node, credential_since: datetime | None = None) -> NodeInfo:
    envelope = envelope_counts(node.counts)
    return NodeInfo(
        node_id=node.id,
        node_name=node.name,
        cohort=node.cohort,
        state=NodeState(node.state),
        enrolled_at=node.enrolled_at,
        last_heartbeat=node.last_heartbeat,
        edge_version=node.edge_version,
        model_id=node.model_id,
        model_version=node.model_version,
        publication_id=node.publication_id,
        health=node.health,
        credential_since=credential_since,
        envelope_images=envelope.images if envelope else None,
        envelope_outside=envelope.outside if envelope else None,
        envelope_drifting=envelope.drifting if envelope else None,
        envelope_negative=envelope.negative if envelope else None,
        envelope_kept=envelope.kept if envelope else None,
    )


def listed_nodes(session: Session) -> list[NodeInfo]:
    """Every node by name, with when its current credential was set (the operator's view of rotation)."""
    since: dict[str, datetime] = {
        node_id: at
        for node_id, at in session.execute(
            select(Credential.node_id, func.max(Credential.created_at))
            .where(Credential.kind == "node", Credential.revoked_at.is_(None))
            .group_by(Credential.node_id)
        )
    }
    return [node_info(n, since.get(n.id)) for n in session.scalars(select(Node).order_by(Node.name))]


def issue_join_code(
    session: Session, *, name: str, cohort: str, ttl_s: int, hub_url: str, tls_sha256: str, actor: str
) -> tuple[str, Node, datetime]:
    """A new pending node and its single-use join code. A pending node of that name gets a fresh code."""
    now = utcnow()
    node = session.scalars(select(Node).where(Node.name == name)).one_or_none()
    if node is not None and node.state != NodeState.PENDING.value:
        raise ConflictError(f"a node named {name!r} is already {node.state}; pick another name")
    if node is None:
        node = Node(
            id="n-" + secrets.token_hex(6),
            name=name,
            cohort=cohort,
            state=NodeState.PENDING.value,
            created_at=now,
            counts={},
        )
        session.add(node)
        session.flush()
    else:
        node.cohort = cohort
        # An earlier, unused code for this site stops working: only the newest one is valid.
        session.execute(
            update(Credential)
            .where(Credential.node_id == node.id, Credential.kind == "join", Credential.used_at.is_(None))
            .values(revoked_at=now)
        )
    secret = secrets.token_urlsafe(32)
    expires = now + timedelta(seconds=ttl_s)
    session.add(
        Credential(
            node_id=node.id,
            kind="join",
            secret_sha256=secret_digest(secret),
            created_at=now,
            expires_at=expires,
        )
    )
    code = JoinCode(hub_url=hub_url, tls_sha256=tls_sha256, secret=secret, node_name=name, expires_at=expires)
    audit(session, actor, "node.join_code", node.id, f"name={name} cohort={cohort} ttl_s={ttl_s}")
    return encode_join_code(code), node, expires


def enroll_node(session: Session, request: EnrollRequest) -> Node:
    """Turn a join secret into an active node holding the credential the node generated."""
    if request.wire_version != WIRE_VERSION:
        raise ConflictError(f"this hub speaks wire version {WIRE_VERSION}, the node {request.wire_version}")
    now = utcnow()
    cred = session.scalars(
        select(Credential).where(
            Credential.secret_sha256 == secret_digest(request.join_secret), Credential.kind == "join"
        )
    ).one_or_none()
    if cred is None or cred.revoked_at is not None:
        raise JoinCodeRefused("unknown join code; ask the hub operator for a new one")
    if cred.used_at is not None:
        raise JoinCodeRefused("this join code was already used; ask the hub operator for a new one")
    if cred.expires_at is not None and cred.expires_at <= now:
        raise JoinCodeRefused("this join code has expired; ask the hub operator for a new one")
    # The conditional update is the single-use guarantee when two enrollments race (several workers).
    claimed = session.execute(
        update(Credential).where(Credential.id == cred.id, Credential.used_at.is_(None)).values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise JoinCodeRefused("this join code was already used; ask the hub operator for a new one")
    node = session.get(Node, cred.node_id)
    if node is None or node.state != NodeState.PENDING.value:
        raise JoinCodeRefused("this join code's site is not waiting to enroll; ask for a new code")
    if session.scalars(
        select(Credential.id).where(Credential.secret_sha256 == secret_digest(request.credential))
    ).first():
        raise ConflictError("this credential is already in use; generate a new random one")
    node.state = NodeState.ACTIVE.value
    node.enrolled_at = now
    node.edge_version = request.edge_version
    session.add(
        Credential(
            node_id=node.id, kind="node", secret_sha256=secret_digest(request.credential), created_at=now
        )
    )
    audit(session, node.id, "node.enrolled", node.id, f"edge_version={request.edge_version}")
    logger.info("node %s (%s) enrolled", node.id, node.name)
    return node


def parse_bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


#: The columns a credential check needs, built once (requests that only need the node's id use it).
_CREDENTIAL = (
    select(Node.id, Node.state, Credential.revoked_at)
    .join(Node, Node.id == Credential.node_id)
    .where(Credential.secret_sha256 == bindparam("digest"), Credential.kind == "node")
)


def _checked(token: str, found: tuple[str, str, datetime | None] | None) -> None:
    """Refuse a token whose credential ``found`` (node id, node state, revoked at) is absent or not active."""
    node_id = token.partition(".")[0]
    if found is None or found[0] != node_id:
        raise AuthError("unknown node credential; enroll again with a new join code")
    if found[1] == NodeState.REVOKED.value:
        raise RevokedError(f"node {node_id} was revoked by the hub operator")
    if found[2] is not None:
        raise AuthError("this credential was rotated out; use the current one")


def _secret(token: str) -> str:
    node_id, dot, secret = token.partition(".")
    if not dot or not node_id or not secret:
        raise AuthError("malformed node credential; expected Bearer <node_id>.<secret>")
    return secret


def authenticate_node(session: Session, token: str) -> Node:
    """The active node this ``<node_id>.<secret>`` token belongs to; AuthError / RevokedError otherwise."""
    secret = _secret(token)
    row = session.execute(
        select(Credential, Node)
        .join(Node, Node.id == Credential.node_id)
        .where(Credential.secret_sha256 == secret_digest(secret), Credential.kind == "node")
    ).one_or_none()
    cred, node = row if row is not None else (None, None)
    _checked(token, None if node is None or cred is None else (node.id, node.state, cred.revoked_at))
    assert node is not None  # checked
    return node


def authenticate_node_id(session: Session, token: str) -> str:
    """``authenticate_node`` for a request that needs only the node's id: three columns, not two rows."""
    found = session.execute(_CREDENTIAL, {"digest": secret_digest(_secret(token))}).one_or_none()
    _checked(token, None if found is None else (found[0], found[1], found[2]))
    return token.partition(".")[0]


def rotate_credential(session: Session, node: Node, new_secret: str) -> None:
    """Replace the node's credential; the old one stops working with this commit."""
    digest = secret_digest(new_secret)
    if session.scalars(select(Credential.id).where(Credential.secret_sha256 == digest)).first():
        raise ConflictError("this credential is already in use; generate a new random one")
    now = utcnow()
    session.execute(
        update(Credential)
        .where(Credential.node_id == node.id, Credential.kind == "node", Credential.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    session.add(Credential(node_id=node.id, kind="node", secret_sha256=digest, created_at=now))
    audit(session, node.id, "node.credential_rotated", node.id, None)


def revoke_node(session: Session, node_ref: str, *, actor: str) -> Node:
    """Revoke a node by id or name: every credential of it stops working on its next request."""
    node = (
        session.get(Node, node_ref)
        or session.scalars(select(Node).where(Node.name == node_ref)).one_or_none()
    )
    if node is None:
        raise NotFoundError(f"no node {node_ref!r}; see `fedclinic-hub nodes list`")
    now = utcnow()
    node.state = NodeState.REVOKED.value
    node.revoked_at = now
    session.execute(
        update(Credential)
        .where(Credential.node_id == node.id, Credential.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    audit(session, actor, "node.revoked", node.id, None)
    logger.info("node %s (%s) revoked", node.id, node.name)
    return node
