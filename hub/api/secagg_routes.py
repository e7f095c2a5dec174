"""Routes of secure aggregation: a node posts its message of each step and reads what the hub relays."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from edge_node.protocol.errors import SecAggError
from edge_node.protocol.secagg import ShareKeys, UnmaskResponse
from edge_node.protocol.secagg_exchange import (
    MASKED_MEDIA_TYPE,
    SecAggAdvertisement,
    SecAggReceipt,
    SecAggRelay,
    SecAggStep,
    unpack_masked,
)
from edge_node.protocol.wire import ErrorBody
from hub.api.auth import NodeToken
from hub.api.context import context_of
from hub.service.enrollment import authenticate_node_id
from hub.service.errors import UpdateRejected

__all__ = ["router"]

router = APIRouter(prefix="/v1/secagg", tags=["node"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503)
}


def _node(request: Request, token: str) -> str:
    with context_of(request).db.session() as session:
        return authenticate_node_id(session, token)


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


_MASKED_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {MASKED_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/{round_id}/masked", response_model=SecAggReceipt, responses=_ERRORS, openapi_extra=_MASKED_BODY
)
async def masked(request: Request, token: NodeToken, round_id: str) -> SecAggReceipt:
    """Step 3: the masked input, a binary body: the length of the signed ``MaskedInput``'s JSON (4 bytes,
    big-endian), that JSON, then the npz payload it covers (its sha256 and length are in the message)."""
    ctx = context_of(request)
    body = await request.body()
    json_sent = request.headers.get("content-type", "").startswith("application/json")

    def take() -> SecAggReceipt:
        node_id = _node(request, token)
        if json_sent:
            raise UpdateRejected(
                f"the masked input travels as {MASKED_MEDIA_TYPE} (the signed message, then the payload), "
                "not JSON: this node's software is older than the hub's"
            )
        try:
            message, payload = unpack_masked(body)
        except SecAggError as exc:
            raise UpdateRejected(str(exc)) from exc
        return ctx.rounds.secagg.receive(node_id, round_id, SecAggStep.MASKED, message, payload=payload)

    return await run_in_threadpool(take)


@router.post("/{round_id}/unmask", response_model=SecAggReceipt, responses=_ERRORS)
def unmask(request: Request, token: NodeToken, round_id: str, body: UnmaskResponse) -> SecAggReceipt:
    """Step 4: the node's shares that remove the survivors' self masks and the dropped nodes' masks."""
    ctx = context_of(request)
    return ctx.rounds.secagg.receive(_node(request, token), round_id, SecAggStep.UNMASK, body)


@router.get("/{round_id}/{step}", response_model=SecAggRelay, responses=_ERRORS)
async def relay(
    request: Request,
    token: NodeToken,
    round_id: str,
    step: SecAggStep,
    wait: Annotated[
        float, Query(ge=0, le=300, description="Long-poll up to this many seconds for the step to close")
    ] = 0.0,
) -> Response:
    """What the hub relays once ``step`` closed: the roster, the shares, or the unmask request.

    With ``wait`` the answer comes as soon as the step closed or the round failed (long-poll, bounded by
    the hub's ``max_wait_s``); a waiting node costs the store a look only when a step may have closed.
    """
    ctx = context_of(request)
    desk, signal = ctx.rounds.secagg, ctx.secagg_signal
    deadline = time.monotonic() + min(wait, ctx.settings.max_wait_s)
    generation = signal.generation  # read before the look, so a closing during it is not missed

    def first_look() -> tuple[str, bytes, bool]:
        node_id = _node(request, token)
        # A ``SecAggRelay`` body serialised by the desk (once per closed step), not again per request.
        return (node_id, *desk.relay_json(node_id, round_id, step))

    node_id, body, final = await run_in_threadpool(first_look)
    while not final:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            break
        # Woken by a closing in this worker, or by the tick's look at the store (another worker's closing);
        # every few seconds only to notice a client that went away.
        await signal.wait_past(generation, min(remaining, 5.0))
        if signal.generation != generation:
            generation = signal.generation
            body, final = await run_in_threadpool(desk.relay_json, node_id, round_id, step)
    return Response(content=body, media_type="application/json")
