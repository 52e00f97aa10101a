"""Liveness and readiness probes (no API key needed)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from darwinfront import __version__
from service.routes.deps import StoreDep, blocking

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok", "version": __version__}


@router.get("/readyz", responses={503: {"description": "Redis does not answer."}})
async def readyz(store: StoreDep) -> JSONResponse:
    """The service can reach its Redis."""
    try:
        await blocking(store.ping)
    except (redis.ConnectionError, redis.TimeoutError) as error:
        body = {"error": {"code": "not_ready", "message": f"Redis does not answer: {error}", "field": None}}
        return JSONResponse(body, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return JSONResponse({"status": "ready"})
