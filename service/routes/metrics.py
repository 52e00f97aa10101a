"""Prometheus metrics at `/metrics` (no API key: scrapers carry none; it shows counts and job ids, no specs)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import monitoring
from service.routes.deps import blocking

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Jobs by status, queue depth, evaluations and their latency, fronts of running jobs, evaluators alive."""
    body = await blocking(monitoring.render, request.app.state.redis)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
