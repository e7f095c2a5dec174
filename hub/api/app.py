"""The hub's FastAPI application (``/v1``, OpenAPI at ``/v1/openapi.json``) and its error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_node.protocol.secagg_exchange import MAX_MASKED_MESSAGE
from edge_node.protocol.wire import WIRE_VERSION, ErrorBody, ErrorCode, HubHealth
from hub import __version__
from hub.api import admin_routes, node_routes, secagg_routes
from hub.api.context import HubContext
from hub.api.dashboard import dashboard_router
from hub.api.limits import BodyLimit
from hub.service import errors
from hub.service.settings import HubSettings, load_settings

__all__ = ["app_from_env", "create_app"]

logger = logging.getLogger(__name__)

#: Bodies of every route but update submissions are small JSON documents.
SMALL_BODY_LIMIT = 64 * 1024

_STATUS: list[tuple[type[Exception], int, ErrorCode]] = [
    (errors.RevokedError, 401, ErrorCode.REVOKED),
    (errors.JoinCodeRefused, 401, ErrorCode.INVALID_JOIN_CODE),
    (errors.AuthError, 401, ErrorCode.UNAUTHENTICATED),
    (errors.ForbiddenError, 403, ErrorCode.FORBIDDEN),
    (errors.NotFoundError, 404, ErrorCode.NOT_FOUND),
    (errors.TaskClosedError, 409, ErrorCode.TASK_CLOSED),
    (errors.DuplicateUpdateError, 409, ErrorCode.DUPLICATE_UPDATE),
    (errors.ConflictError, 409, ErrorCode.CONFLICT),
    (errors.UpdateRejected, 422, ErrorCode.UPDATE_REJECTED),
    (errors.RoundConfigError, 422, ErrorCode.INVALID_REQUEST),
    (errors.SetupError, 422, ErrorCode.INVALID_REQUEST),
]


def _error(status: int, code: ErrorCode, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(code=code, reason=reason).model_dump(mode="json"), status, headers=headers)


def _http_code(status: int) -> ErrorCode:
    return {
        401: ErrorCode.UNAUTHENTICATED,
        403: ErrorCode.FORBIDDEN,
        404: ErrorCode.NOT_FOUND,
        413: ErrorCode.PAYLOAD_TOO_LARGE,
        503: ErrorCode.UNAVAILABLE,
    }.get(status, ErrorCode.INVALID_REQUEST)


def create_app(settings: HubSettings, *, tick: bool = True) -> FastAPI:
    """The API for the hub whose data directory ``settings`` names (built by ``fedclinic-hub init``)."""
    ctx = HubContext.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        ctx.signal.bind(asyncio.get_running_loop())
        ctx.secagg_signal.bind(asyncio.get_running_loop())
        ticker = asyncio.create_task(_tick_forever(ctx)) if tick else None
        try:
            yield
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            ctx.db.close()

    app = FastAPI(
        title="fedclinic hub",
        version=__version__,
        summary="Clinics enroll, pull models and tasks, and send updates; the operator runs the federation.",
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.hub = ctx

    @app.exception_handler(errors.HubServiceError)
    async def _service_error(_request: Request, exc: errors.HubServiceError) -> JSONResponse:
        for cls, status, code in _STATUS:
            if isinstance(exc, cls):
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return _error(status, code, str(exc), headers)
        return _error(422, ErrorCode.INVALID_REQUEST, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]
        )
        return _error(422, ErrorCode.INVALID_REQUEST, f"the request does not match the schema: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(
            exc.status_code, _http_code(exc.status_code), str(exc.detail), getattr(exc, "headers", None)
        )

    @app.exception_handler(OperationalError)
    async def _busy(_request: Request, exc: OperationalError) -> JSONResponse:
        logger.warning("store busy: %s", exc.orig)
        return _error(
            503, ErrorCode.UNAVAILABLE, "the hub's store is busy; retry shortly", {"Retry-After": "1"}
        )

    @app.get("/v1/health", response_model=HubHealth, tags=["node"])
    def health() -> HubHealth:
        """Liveness and versions; needs no credential."""
        return HubHealth(status="ok", version=__version__, wire_version=WIRE_VERSION)

    app.include_router(node_routes.router)
    app.include_router(secagg_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(dashboard_router(ctx.db, ctx.is_admin_token))

    def limit_for(path: str) -> int:
        if path.startswith("/v1/secagg/") and path.endswith("/masked"):
            # A binary body: the npz and the signed message before it.
            return settings.max_update_bytes + MAX_MASKED_MESSAGE + 4
        if path.endswith("/update"):
            # base64 grows the npz by 4/3; the envelope and JSON framing need a little more.
            return settings.max_update_bytes * 4 // 3 + 16 * 1024
        return SMALL_BODY_LIMIT

    app.add_middleware(BodyLimit, limit_for=limit_for)
    return app


async def _tick_forever(ctx: HubContext) -> None:
    """Close rounds at their deadline and take over work of dead processes, every ``tick_s`` seconds."""
    collecting: set[str] | None = None
    while True:
        try:
            await run_in_threadpool(ctx.rounds.tick)
            # A round that another worker or the CLI started wakes this worker's long-polls too. Only a round
            # that entered collecting can have tasks for them: a round that closed wakes nobody, so the end of
            # a round does not send every idle node back to the store.
            _newest, ids = await run_in_threadpool(ctx.rounds.activity_marker)
            now = set(ids)
            if collecting is None or now - collecting:
                ctx.signal.notify()
            collecting = now
        except Exception:  # the ticker must outlive a busy store or one bad round; the log says what happened
            logger.exception("round tick failed")
        await asyncio.sleep(ctx.settings.tick_s)


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` workers: settings from the FEDCLINIC_HUB_* environment."""
    return create_app(load_settings())
