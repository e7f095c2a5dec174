"""Operator routes under /v1/admin, behind the admin token: nodes, rounds, publications, status."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import func, select

from edge_node.protocol.publication import SignedPublication
from edge_node.protocol.wire import (
    ErrorBody,
    HubStatus,
    JoinCodeIssued,
    JoinCodeRequest,
    NodeInfo,
    NodeList,
    NodeState,
    PublicationList,
    RollbackRequest,
    RoundInfo,
    RoundList,
    RoundStart,
    RoundState,
    RoundUpdatesInfo,
)
from hub.api.auth import AdminToken, require_admin
from hub.api.context import HubContext, context_of
from hub.service.enrollment import issue_join_code, listed_nodes, node_info, revoke_node
from hub.service.publishing import list_publications, rollback
from hub.store.schema import Node, Publication, Round

__all__ = ["router"]

router = APIRouter(prefix="/v1/admin", tags=["admin"])

_ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody} for c in (400, 401, 403, 422, 503)}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
}


def _admin(request: Request, token: str) -> HubContext:
    ctx = context_of(request)
    with ctx.db.session() as session:
        require_admin(session, token, ctx.is_admin_token(token))
    return ctx


def hub_url(ctx: HubContext, request: Request) -> str:
    """The address nodes should use: the configured public URL, else the one this request came to."""
    return ctx.settings.public_url or str(request.base_url).rstrip("/")


@router.get("/nodes", response_model=NodeList, responses=_ERRORS)
def list_nodes(request: Request, token: AdminToken) -> NodeList:
    ctx = _admin(request, token)
    with ctx.db.session() as session:
        return NodeList(nodes=listed_nodes(session))


@router.post("/nodes", response_model=JoinCodeIssued, status_code=201, responses=_NOT_FOUND)
def create_join_code(request: Request, token: AdminToken, body: JoinCodeRequest) -> JoinCodeIssued:
    """A pending node and its single-use join code (carries the hub URL and TLS fingerprint)."""
    ctx = _admin(request, token)
    with ctx.db.session() as session:
        code, node, expires = issue_join_code(
            session,
            name=body.node_name,
            cohort=body.cohort,
            ttl_s=body.ttl_s,
            hub_url=hub_url(ctx, request),
            tls_sha256=ctx.tls_sha256,
            actor="admin",
        )
        return JoinCodeIssued(join_code=code, node=node_info(node), expires_at=expires)


@router.post("/nodes/{node_id}/revoke", response_model=NodeInfo, responses=_NOT_FOUND)
def revoke(request: Request, token: AdminToken, node_id: str) -> NodeInfo:
    ctx = _admin(request, token)
    with ctx.db.session() as session:
        return node_info(revoke_node(session, node_id, actor="admin"))


@router.get("/rounds", response_model=RoundList, responses=_ERRORS)
def list_rounds(request: Request, token: AdminToken) -> RoundList:
    ctx = _admin(request, token)
    return RoundList(rounds=ctx.rounds.recent())


@router.post("/rounds", response_model=RoundInfo, status_code=201, responses=_NOT_FOUND)
def start_round(request: Request, token: AdminToken, body: RoundStart) -> RoundInfo:
    ctx = _admin(request, token)
    info = ctx.rounds.start(body, actor="admin")
    ctx.signal.notify()
    return info


@router.get("/rounds/{round_id}", response_model=RoundInfo, responses=_NOT_FOUND)
def get_round(request: Request, token: AdminToken, round_id: str) -> RoundInfo:
    ctx = _admin(request, token)
    return ctx.rounds.info(round_id)


@router.get("/rounds/{round_id}/updates", response_model=RoundUpdatesInfo, responses=_NOT_FOUND)
def round_updates(request: Request, token: AdminToken, round_id: str) -> RoundUpdatesInfo:
    """Each node's update of a training round, read against the others' (`fedclinic-hub rounds updates`);
    409 for a collection round, one under secure aggregation, or one no node has answered yet."""
    ctx = _admin(request, token)
    return ctx.rounds.updates(round_id)


@router.post("/rounds/{round_id}/cancel", response_model=RoundInfo, responses=_NOT_FOUND)
def cancel_round(request: Request, token: AdminToken, round_id: str) -> RoundInfo:
    ctx = _admin(request, token)
    return ctx.rounds.cancel(round_id, actor="admin")


@router.get("/publications", response_model=PublicationList, responses=_ERRORS)
def publications(request: Request, token: AdminToken) -> PublicationList:
    ctx = _admin(request, token)
    with ctx.db.session() as session:
        return PublicationList(publications=list_publications(session))


@router.post(
    "/publications/rollback", response_model=SignedPublication, status_code=201, responses=_NOT_FOUND
)
def rollback_publication(request: Request, token: AdminToken, body: RollbackRequest) -> SignedPublication:
    ctx = _admin(request, token)
    return rollback(
        ctx.db,
        ctx.signing_key,
        to_publication_id=body.to_publication_id,
        cohort=body.cohort,
        ttl_days=ctx.settings.publication_ttl_days,
    )


def hub_status(ctx: HubContext) -> HubStatus:
    from hub import __version__

    with ctx.db.session() as session:
        nodes: dict[str, int] = {
            s: int(c) for s, c in session.execute(select(Node.state, func.count()).group_by(Node.state))
        }
        rounds: dict[str, int] = {
            s: int(c) for s, c in session.execute(select(Round.state, func.count()).group_by(Round.state))
        }
        pubs = int(session.scalar(select(func.count(Publication.id))) or 0)
    return HubStatus(
        version=__version__,
        nodes_active=nodes.get(NodeState.ACTIVE.value, 0),
        nodes_revoked=nodes.get(NodeState.REVOKED.value, 0),
        nodes_pending=nodes.get(NodeState.PENDING.value, 0),
        rounds_open=sum(
            rounds.get(s.value, 0) for s in (RoundState.OPEN, RoundState.COLLECTING, RoundState.AGGREGATING)
        ),
        rounds_published=rounds.get(RoundState.PUBLISHED.value, 0),
        rounds_failed=rounds.get(RoundState.FAILED.value, 0),
        publications=pubs,
        store=ctx.db.describe(),
    )


@router.get("/status", response_model=HubStatus, responses=_ERRORS)
def status(request: Request, token: AdminToken) -> HubStatus:
    return hub_status(_admin(request, token))
