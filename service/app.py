"""The FastAPI application: `create_app()`, its lifespan (Redis opens here, never at import) and error shape.

Every error leaves as `{"error": {"code", "message", "field"}}`; domain errors map to HTTP statuses in
`_DOMAIN_ERRORS`, and nothing else (no traceback) ever reaches the client.

Run: `uvicorn --factory service.app:create_app`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from darwinfront import __version__
from darwinfront.errors import CandidateNotFound, InvalidSpec, InvalidTransition, JobNotFound
from service.embedded import EmbeddedRedis, redis_url
from service.routes import candidates, dashboard, events, front, health, history, jobs, metrics, stream
from service.routes.deps import require_tenant
from service.settings import Settings, get_settings
from service.store import JobStore

log = logging.getLogger(__name__)

_DOMAIN_ERRORS: dict[type[Exception], tuple[int, str]] = {
    InvalidSpec: (422, "invalid_spec"),
    JobNotFound: (404, "job_not_found"),
    CandidateNotFound: (404, "candidate_not_found"),
    InvalidTransition: (409, "invalid_transition"),
    redis.ConnectionError: (503, "store_unavailable"),
    redis.TimeoutError: (503, "store_unavailable"),
}
_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    503: "unavailable",
}


def _error(status: int, code: str, message: str, field: str | None = None, **kwargs: Any) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, **kwargs)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    return ".".join(str(p) for p in parts) or str(loc[0] if loc else "body")


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        bad = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (bad.get("ctx") or {}).get("error", "invalid JSON")
        where = f" at position {bad['loc'][1]}" if len(bad.get("loc", ())) > 1 else ""
        return _error(422, "malformed_json", f"request body is not valid JSON{where}: {reason}", "body")
    messages = []
    for e in errors:
        text = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        messages.append(f"{_field_path(tuple(e.get('loc', ())))}: {text}")
    first = _field_path(tuple(errors[0].get("loc", ()))) if errors else None
    return _error(422, "invalid_request", "; ".join(messages), first)


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
    code = detail.get("code") or _HTTP_CODES.get(exc.status_code, "error")
    return _error(exc.status_code, code, detail.get("message", ""), detail.get("field"),
                  headers=getattr(exc, "headers", None))


async def _on_domain(request: Request, exc: Exception) -> JSONResponse:
    for kind in type(exc).__mro__:
        if kind in _DOMAIN_ERRORS:
            status, code = _DOMAIN_ERRORS[kind]
            break
    else:  # pragma: no cover - only registered kinds reach this handler
        status, code = 500, "internal_error"
    if status == 503:
        log.warning("Redis unavailable: %s", exc)
        return _error(status, code, "the job store is unavailable; retry later")
    if isinstance(exc, InvalidSpec):
        return _error(status, code, str(exc), exc.field)
    return _error(status, code, str(exc))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(500, "internal_error", "internal server error")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        url = redis_url(settings)
        if url is None:
            embedded = stack.enter_context(EmbeddedRedis(settings.data_dir))
            url = embedded.url
            log.info("no REDIS_URL: started an embedded Redis at %s", url)
        pool = redis.ConnectionPool.from_url(
            url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
        )
        stack.callback(pool.disconnect)
        app.state.redis_url = url
        app.state.store = JobStore(redis.Redis(connection_pool=pool))
        app.state.redis = redis.Redis(connection_pool=pool)  # /metrics reads aggregates the store has no call for
        # Event streams wait on this one (XREAD BLOCK up to stream.HEARTBEAT_SECONDS): a longer socket timeout.
        app.state.aredis = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=60)
        stack.push_async_callback(app.state.aredis.aclose)
        yield


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API.

    Args:
        settings: Use these instead of the environment's (`get_settings()`); routes reach them through the
            `app_settings` dependency.

    Returns:
        The application; Redis is opened by its lifespan, when the server starts.
    """
    resolved = settings or get_settings()  # refuses placeholder secrets now, not on the first request
    app = FastAPI(
        title="darwinfront",
        version=__version__,
        summary="Evolutionary search for compressed variants of language models.",
        lifespan=_lifespan,
    )
    app.state.settings = resolved
    if resolved.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=resolved.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"])
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    for kind in _DOMAIN_ERRORS:
        app.add_exception_handler(kind, _on_domain)
    app.add_exception_handler(Exception, _on_unexpected)

    app.include_router(health.router)
    app.include_router(metrics.router)
    dashboard.install(app)
    authenticated = [Depends(require_tenant)]
    for module in (jobs, front, events, candidates, history, stream):
        app.include_router(module.router, prefix="/v1", dependencies=authenticated)
    return app
