"""A KV-precision job's sensitivity profile: per layer and per (key bits, value bits) pair, e_o, e_k, e_v."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from service.routes.deps import JobDep, StoreDep, blocking
from service.schemas import ErrorBody

router = APIRouter(prefix="/jobs", tags=["results"])


@router.get("/{job_id}/sensitivity", responses={404: {"model": ErrorBody}})
async def get_sensitivity(job: JobDep, store: StoreDep) -> dict[str, Any]:
    """The profile the KV search pruned and grouped its space from (404 until profiled, and for pruning jobs)."""
    table = await blocking(store.get_sensitivity, job.id)
    if table is None:
        detail = f"job {job.id} has no sensitivity profile (kv_precision jobs only, once profiled)"
        raise HTTPException(404, detail=detail)
    return table
