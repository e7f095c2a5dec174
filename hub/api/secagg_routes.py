"""Routes of secure aggregation: a node posts its message of each step and reads what the hub relays."""

from __future__ import annotations

import time
from collections.abc import Callable
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
    receipt_json,
    unpack_masked,
)
from edge_node.protocol.wire import ErrorBody
from hub.api.auth import NodeToken
from hub.api.context import context_of
from hub.service.enrollment import authenticate_node_id
from hub.service.errors import HubServiceError, UpdateRejected

__all__ = ["router"]

router = APIRouter(prefix="/v1/secagg", tags=["node"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503)
}


def _node(request: Request, token: str) -> str:
    with context_of(request).db.session() as session:
        return authenticate_node_id(session, token)


_Wait = Annotated[
    float, Query(ge=0, le=300, description="Long-poll up to this many seconds for the step to close")
]


async def _closed(
    request: Request, node_id: str, round_id: str, step: SecAggStep, wait: float, generation: int
) -> bytes | None:
    """The step's relay once it is final (closed, or the round failed) within ``wait``, else None.

    Looks at the store only when woken (a closing in this worker, or the tick's look at the store that
    found another worker's), once per wake; ``generation`` is the signal's, read before the node's message
    was taken, so that a closing since then (its own message's included) is not missed.
    """
    ctx = context_of(request)
    desk, signal = ctx.rounds.secagg, ctx.secagg_signal
    deadline = time.monotonic() + min(wait, ctx.settings.max_wait_s)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            return None
        # Every few seconds only to notice a client that went away.
        await signal.wait_past(generation, min(remaining, 5.0))
        if signal.generation != generation:
            generation = signal.generation
            body, final = await run_in_threadpool(desk.relay_json, node_id, round_id, step)
            if final:
                return body


async def _receive(
    request: Request,
    round_id: str,
    step: SecAggStep,
    wait: float,
    take: Callable[[], SecAggReceipt],
) -> Response:
    """Keep the node's message (``take``, in the thread pool); with ``wait``, wait for its step's relay."""
    generation = context_of(request).secagg_signal.generation  # before the message can close the step
    receipt = await run_in_threadpool(take)
    relay = None
    if wait > 0:
        try:
            relay = await _closed(request, receipt.node_id, round_id, step, wait, generation)
        except HubServiceError:  # e.g. the message raced its step's closing: the node's GET gets the reason
            relay = None
    return Response(content=receipt_json(receipt, relay), media_type="application/json")


@router.post("/{round_id}/advertise", response_model=SecAggReceipt, responses=_ERRORS)
async def advertise(
    request: Request, token: NodeToken, round_id: str, body: SecAggAdvertisement, wait: _Wait = 0.0
) -> Response:
    """Step 1: the node's keys for the round, signed by the round signing key it sends beside them.

    With ``wait`` the receipt carries the roster once the step closed (as the relay GET would)."""
    ctx = context_of(request)

    def take() -> SecAggReceipt:
        node_id = _node(request, token)
        return ctx.rounds.secagg.receive(
            node_id, round_id, SecAggStep.ADVERTISE, body.message, signing_public=body.signing_public
        )

    return await _receive(request, round_id, SecAggStep.ADVERTISE, wait, take)


@router.post("/{round_id}/share", response_model=SecAggReceipt, responses=_ERRORS)
async def share(
    request: Request, token: NodeToken, round_id: str, body: ShareKeys, wait: _Wait = 0.0
) -> Response:
    """Step 2: the node's encrypted shares, one per peer that advertised keys.

    With ``wait`` the receipt carries every node's shares once the step closed."""
    ctx = context_of(request)

    def take() -> SecAggReceipt:
        return ctx.rounds.secagg.receive(_node(request, token), round_id, SecAggStep.SHARE, body)

    return await _receive(request, round_id, SecAggStep.SHARE, wait, take)


_MASKED_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {MASKED_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/{round_id}/masked", response_model=SecAggReceipt, responses=_ERRORS, openapi_extra=_MASKED_BODY
)
async def masked(request: Request, token: NodeToken, round_id: str, wait: _Wait = 0.0) -> Response:
    """Step 3: the masked input, a binary body: the length of the signed ``MaskedInput``'s JSON (4 bytes,
    big-endian), that JSON, then the npz payload it covers (its sha256 and length are in the message).

    With ``wait`` the receipt carries the unmask request once the step closed."""
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

    return await _receive(request, round_id, SecAggStep.MASKED, wait, take)


@router.post("/{round_id}/unmask", response_model=SecAggReceipt, responses=_ERRORS)
def unmask(request: Request, token: NodeToken, round_id: str, body: UnmaskResponse) -> SecAggReceipt:
    """Step 4: the node's shares that remove the survivors' self masks and the dropped nodes' masks."""
    ctx = context_of(request)
    return ctx.rounds.secagg.receive(_node(request, token), round_id, SecAggStep.UNMASK, body)


@router.get("/{round_id}/{step}", response_model=SecAggRelay, responses=_ERRORS)
async def relay(
    request: Request, token: NodeToken, round_id: str, step: SecAggStep, wait: _Wait = 0.0
) -> Response:
    """What the hub relays once ``step`` closed: the roster, the shares, or the unmask request.

    With ``wait`` the answer comes as soon as the step closed or the round failed (long-poll, bounded by
    the hub's ``max_wait_s``); a waiting node costs the store a look only when a step may have closed.
    """
    ctx = context_of(request)
    desk = ctx.rounds.secagg
    generation = ctx.secagg_signal.generation  # read before the look, so a closing during it is not missed

    def first_look() -> tuple[str, bytes, bool]:
        node_id = _node(request, token)
        # A ``SecAggRelay`` body serialised by the desk (once per closed step), not again per request.
        return (node_id, *desk.relay_json(node_id, round_id, step))

    node_id, body, final = await run_in_threadpool(first_look)
    if not final and wait > 0:
        body = await _closed(request, node_id, round_id, step, wait, generation) or body
    return Response(content=body, media_type="application/json")
