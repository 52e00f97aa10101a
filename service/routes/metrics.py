"""Prometheus metrics at `/metrics`. No API key (scrapers carry none): aggregates over all tenants, and the
per-job series (job ids and their figures) only when `DARWINFRONT_METRICS_PER_JOB` turns them on."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import monitoring
from service.routes.deps import SettingsDep, blocking

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request, settings: SettingsDep) -> Response:
    """Jobs by status, queue depth, evaluations and their latency, evaluators alive; per running job (when turned
    on) its evaluations, generation, front size and hypervolume, and evaluators replaced."""
    state = request.app.state
    body = await blocking(monitoring.render, state.store, state.telemetry, per_job=settings.metrics_per_job)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
