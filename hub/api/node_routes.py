"""Routes a node calls: enroll, heartbeat, credential rotation, bundle, tasks, task params, updates."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from sqlalchemy import select

from edge_node.protocol.publication import SignedPublication
from edge_node.protocol.wire import (
    CredentialRotation,
    EnrollRequest,
    EnrollResponse,
    ErrorBody,
    Heartbeat,
    HeartbeatReply,
    RefusalReceipt,
    TaskList,
    TaskRefusal,
    UpdateReceipt,
    UpdateSubmission,
)
from hub.api.auth import NodeToken, node_in
from hub.api.context import context_of
from hub.service.enrollment import enroll_node, rotate_credential
from hub.service.errors import NotFoundError
from hub.service.heartbeat import record_heartbeat
from hub.service.publishing import current_publication
from hub.store.schema import Artifact, Publication, utcnow

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["node"])


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


_NODE_ERRORS = _errors(400, 401, 403, 422, 503)


@router.post("/enroll", response_model=EnrollResponse, responses=_errors(400, 401, 409, 422, 503))
def enroll(request: Request, body: EnrollRequest) -> EnrollResponse:
    """Trade a one-time join secret for an active node that holds the credential it generated."""
    ctx = context_of(request)
    with ctx.db.session() as session:
        node = enroll_node(session, body)
        return EnrollResponse(
            node_id=node.id,
            node_name=node.name,
            cohort=node.cohort,
            hub_public_key_pem=ctx.public_key_pem,
            heartbeat_interval_s=ctx.settings.heartbeat_interval_s,
        )


@router.post("/node/heartbeat", response_model=HeartbeatReply, responses=_NODE_ERRORS)
def heartbeat(request: Request, token: NodeToken, body: Heartbeat) -> HeartbeatReply:
    """Record the node's versions, health and counters; tell it about tasks and its publication."""
    ctx = context_of(request)
    with ctx.db.session() as session:
        node = node_in(session, token)
        record_heartbeat(node, body)
        publication = current_publication(session, node)
        pending = ctx.rounds.count_open_tasks(session, node.id)
        return HeartbeatReply(
            server_time=utcnow(),
            heartbeat_interval_s=ctx.settings.heartbeat_interval_s,
            tasks_pending=pending,
            publication_id=publication.record.publication_id if publication else None,
        )


@router.post("/node/credential", status_code=204, responses=_errors(400, 401, 403, 409, 422, 503))
def rotate(request: Request, token: NodeToken, body: CredentialRotation) -> Response:
    """Replace this node's secret; the old one stops working at once."""
    ctx = context_of(request)
    with ctx.db.session() as session:
        rotate_credential(session, node_in(session, token), body.new_credential)
    return Response(status_code=204)


@router.get(
    "/node/bundle",
    response_model=SignedPublication,
    responses={304: {"description": "The node already has this publication (If-None-Match)"}, **_NODE_ERRORS,
               404: {"model": ErrorBody}},
)  # fmt: skip
def bundle(
    request: Request,
    token: NodeToken,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    """The signed publication this node should serve; ETag is its publication id."""
    ctx = context_of(request)
    with ctx.db.session() as session:
        node = node_in(session, token)
        publication = current_publication(session, node)
    if publication is None:
        raise NotFoundError("nothing is published for this node yet")
    etag = f'"{publication.record.publication_id}"'
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(
        content=publication.model_dump_json(),
        media_type="application/json",
        headers={"ETag": etag, "Cache-Control": "no-cache"},
    )


@router.get(
    "/bundles/{publication_id}/archive",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {}}}, **_NODE_ERRORS, 404: {"model": ErrorBody}},
)
def archive(request: Request, token: NodeToken, publication_id: str) -> FileResponse:
    """The bundle zip of a publication meant for this node (its sha256 is in the signed record)."""
    ctx = context_of(request)
    with ctx.db.session() as session:
        node = node_in(session, token)
        row = session.get(Publication, publication_id)
        signed = SignedPublication.model_validate(row.signed) if row is not None else None
        if row is None or signed is None or not signed.record.targets(node.id, node.cohort):
            # The same answer for "absent" and "another cohort's": a node learns nothing about others.
            raise NotFoundError(f"no publication {publication_id!r} for this node")
        artifact = session.scalars(select(Artifact).where(Artifact.id == row.artifact_id)).one()
    path = Path(ctx.settings.artifacts_dir) / (artifact.path or "")
    if not artifact.path or not path.is_file():
        raise NotFoundError(f"the bundle of publication {publication_id} is missing on the hub")
    return FileResponse(path, media_type="application/zip", headers={"Cache-Control": "no-cache"})


@router.get("/node/tasks", response_model=TaskList, responses=_NODE_ERRORS)
async def tasks(
    request: Request,
    token: NodeToken,
    wait: Annotated[float, Query(ge=0, le=300, description="Long-poll up to this many seconds")] = 0.0,
) -> TaskList:
    """The node's open tasks; with ``wait`` the answer comes as soon as there is one (long-poll)."""
    ctx = context_of(request)

    def _auth() -> str:
        with ctx.db.session() as session:
            return node_in(session, token).id

    node_id = await run_in_threadpool(_auth)
    deadline = time.monotonic() + min(wait, ctx.settings.max_wait_s)
    generation = ctx.signal.generation  # read before the look, so a change during it is not missed
    found = await run_in_threadpool(ctx.rounds.open_tasks, node_id)
    while not found:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            break
        # An idle node costs the store nothing: it is looked at again only when rounds changed (this
        # worker's signal, or the ticker's check of the store). The wait wakes every few seconds only to
        # notice a client that went away.
        await ctx.signal.wait_past(generation, min(remaining, 5.0))
        if ctx.signal.generation != generation:
            generation = ctx.signal.generation
            found = await run_in_threadpool(ctx.rounds.open_tasks, node_id)
    return TaskList(tasks=found)


@router.get(
    "/tasks/{task_id}/params",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **_NODE_ERRORS, 404: {"model": ErrorBody}},
)
def task_params(request: Request, token: NodeToken, task_id: str) -> Response:
    """The npz starting tensors of one of this node's tasks."""
    ctx = context_of(request)
    with ctx.db.session() as session:
        node_id = node_in(session, token).id
    return Response(ctx.rounds.task_params(node_id, task_id), media_type="application/octet-stream")


@router.post(
    "/tasks/{task_id}/update",
    response_model=UpdateReceipt,
    responses={
        **_NODE_ERRORS,
        404: {"model": ErrorBody},
        409: {"model": ErrorBody},
        413: {"model": ErrorBody},
    },
)
def submit_update(request: Request, token: NodeToken, task_id: str, body: UpdateSubmission) -> UpdateReceipt:
    """Submit the update for a task; resending the same payload returns the first receipt (counted once)."""
    ctx = context_of(request)
    with ctx.db.session() as session:
        node_id = node_in(session, token).id
    return ctx.rounds.submit(node_id, task_id, body)


@router.post(
    "/tasks/{task_id}/refusal",
    response_model=RefusalReceipt,
    responses={**_NODE_ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def refuse_task(request: Request, token: NodeToken, task_id: str, body: TaskRefusal) -> RefusalReceipt:
    """The node's privacy floor refuses this task; the reason is recorded and the task counts as failed."""
    ctx = context_of(request)
    with ctx.db.session() as session:
        node_id = node_in(session, token).id
    receipt = ctx.rounds.refuse(node_id, task_id, body.reason)
    ctx.signal.notify()
    return receipt
