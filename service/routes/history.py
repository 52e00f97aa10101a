"""A job's progress over generations: best fitness per target and the front's hypervolume."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service import history
from service.routes.deps import JobDep, StoreDep, blocking
from service.schemas import ErrorBody, History

router = APIRouter(prefix="/jobs", tags=["results"])


@router.get("/{job_id}/history", responses={404: {"model": ErrorBody}})
async def get_history(job: JobDep, store: StoreDep, request: Request) -> History:
    """One point per finished generation, oldest first; the hypervolume is exact (read from the Optuna study)."""
    found = await blocking(history.job_history, store, request.app.state.redis_url, job.id)
    return History(job_id=job.id, scaling=history.SCALING, **found)
