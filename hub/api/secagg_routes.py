"""Routes of secure aggregation: a node posts its message of each step and reads what the hub relays."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, Request, Response

from edge_node.protocol.secagg import ShareKeys, UnmaskResponse
from edge_node.protocol.secagg_exchange import (
    SecAggAdvertisement,
    SecAggMasked,
    SecAggReceipt,
    SecAggRelay,
    SecAggStep,
)
from edge_node.protocol.wire import ErrorBody
from hub.api.auth import NodeToken, node_in
from hub.api.context import context_of
from hub.service.errors import UpdateRejected

__all__ = ["router"]

router = APIRouter(prefix="/v1/secagg", tags=["node"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503)
}


def _node(request: Request, token: str) -> str:
    with context_of(request).db.session() as session:
        return node_in(session, token).id


@router.post("/{round_id}/advertise", response_model=SecAggReceipt, responses=_ERRORS)
def advertise(request: Request, token: NodeToken, round_id: str, body: SecAggAdvertisement) -> SecAggReceipt:
    """Step 1: the node's keys for the round, signed by the round signing key it sends beside them."""
    ctx = context_of(request)
    node_id = _node(request, token)
    return ctx.rounds.secagg.receive(
        node_id, round_id, SecAggStep.ADVERTISE, body.message, signing_public=body.signing_public
    )


@router.post("/{round_id}/share", response_model=SecAggReceipt, responses=_ERRORS)
def share(request: Request, token: NodeToken, round_id: str, body: ShareKeys) -> SecAggReceipt:
    """Step 2: the node's encrypted shares, one per peer that advertised keys."""
    ctx = context_of(request)
    return ctx.rounds.secagg.receive(_node(request, token), round_id, SecAggStep.SHARE, body)


@router.post("/{round_id}/masked", response_model=SecAggReceipt, responses=_ERRORS)
def masked(request: Request, token: NodeToken, round_id: str, body: SecAggMasked) -> SecAggReceipt:
    """Step 3: the masked input and the signed message that covers its payload."""
    ctx = context_of(request)
    node_id = _node(request, token)
    try:
        payload = base64.b64decode(body.payload_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UpdateRejected("payload_b64 is not valid base64") from exc
    return ctx.rounds.secagg.receive(node_id, round_id, SecAggStep.MASKED, body.message, payload=payload)


@router.post("/{round_id}/unmask", response_model=SecAggReceipt, responses=_ERRORS)
def unmask(request: Request, token: NodeToken, round_id: str, body: UnmaskResponse) -> SecAggReceipt:
    """Step 4: the node's shares that remove the survivors' self masks and the dropped nodes' masks."""
    ctx = context_of(request)
    return ctx.rounds.secagg.receive(_node(request, token), round_id, SecAggStep.UNMASK, body)


@router.get("/{round_id}/{step}", response_model=SecAggRelay, responses=_ERRORS)
def relay(request: Request, token: NodeToken, round_id: str, step: SecAggStep) -> Response:
    """What the hub relays once ``step`` closed: the roster, the shares, or the unmask request."""
    ctx = context_of(request)
    # A ``SecAggRelay`` body serialised by the desk (once per closed step), not again per request.
    body = ctx.rounds.secagg.relay_json(_node(request, token), round_id, step)
    return Response(content=body, media_type="application/json")
