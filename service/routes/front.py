"""The Pareto front of a job, as the search last reported it."""

from __future__ import annotations

from fastapi import APIRouter

from service.routes.deps import JobDep, StoreDep, blocking
from service.schemas import ErrorBody, Front

router = APIRouter(prefix="/jobs", tags=["results"])


@router.get("/{job_id}/front", responses={404: {"model": ErrorBody}})
async def get_front(job: JobDep, store: StoreDep) -> Front:
    """The latest front snapshot; empty until the first generation ends."""
    snapshot = await blocking(store.get_front, job.id)
    return Front(job_id=job.id, **snapshot)
