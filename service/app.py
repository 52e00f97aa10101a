"""The FastAPI application: `create_app()`, its lifespan (Redis opens here, never at import) and error shape.

Every error leaves as `{"error": {"code", "message", "field"}}` (see `service.errors`); request bodies are
capped by `service.limits.BodySizeLimit`; CORS is off unless origins are configured.

Run: `uvicorn --factory service.app:create_app`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from darwinfront import __version__
from darwinfront.core.event_wait import EventWaiter
from darwinfront.core.settings import Settings, get_settings
from darwinfront.core.store import JobStore, connect
from darwinfront.core.telemetry import TelemetryStore
from service.embedded import EmbeddedRedis, redis_url
from service.errors import install_error_handlers
from service.limits import BodySizeLimit
from service.routes import (
    candidates,
    dashboard,
    evaluate,
    events,
    front,
    health,
    history,
    jobs,
    metrics,
    sensitivity,
    stream,
)
from service.routes.deps import require_tenant
from service.schemas import ErrorBody

log = logging.getLogger(__name__)

# Errors any authenticated route may answer; routes document their own 404, 409, 429 and so on.
COMMON_ERRORS = {
    401: {"model": ErrorBody, "description": "No API key, or an unknown one."},
    413: {"model": ErrorBody, "description": "The request body is larger than the server accepts."},
    422: {"model": ErrorBody, "description": "A parameter or the body is invalid; the error names the field."},
    503: {"model": ErrorBody, "description": "The job store (Redis) is unavailable; retry later."},
}


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        url = redis_url(settings)
        if url is None:
            embedded = stack.enter_context(EmbeddedRedis(settings.data_dir))
            url = embedded.url
            log.info("no REDIS_URL: started an embedded Redis at %s", url)
        client = connect(url)
        stack.callback(client.close)
        app.state.redis_url = url
        app.state.store = JobStore(client)
        app.state.telemetry = TelemetryStore(client)
        app.state.event_waiter = EventWaiter.connect(url)  # event streams sleep on it, holding no thread
        stack.push_async_callback(app.state.event_waiter.aclose)
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
    app.add_middleware(BodySizeLimit, max_bytes=resolved.max_body_bytes)
    if resolved.cors_origins:  # off unless configured
        app.add_middleware(CORSMiddleware, allow_origins=resolved.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"])
    install_error_handlers(app)

    app.include_router(health.router)
    app.include_router(metrics.router)
    dashboard.install(app)
    authenticated = [Depends(require_tenant)]
    for module in (jobs, evaluate, front, events, candidates, history, stream, sensitivity):
        app.include_router(module.router, prefix="/v1", dependencies=authenticated, responses=COMMON_ERRORS)
    return app
