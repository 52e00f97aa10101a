"""The Pareto front of a job, as the search last reported it."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.etag import conditional
from service.routes.deps import JobDep, StoreDep, blocking
from service.schemas import ErrorBody, Front

router = APIRouter(prefix="/jobs", tags=["results"])


@router.get("/{job_id}/front", responses={404: {"model": ErrorBody}, 304: {"description": "Unchanged."}})
async def get_front(job: JobDep, store: StoreDep, request: Request, response: Response) -> Front:
    """The latest front snapshot; empty until the first generation ends. `If-None-Match` gets a 304 if unchanged.

    A point whose candidate an evaluate job scored carries its lm-eval `scores` (per task: metric, value, stderr,
    the dense model's beside them).
    """
    snapshot = await blocking(store.get_scored_front, job.id)
    return conditional(request, response, Front(job_id=job.id, **snapshot))
