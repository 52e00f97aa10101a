"""The event log of a job, read in pages by stream id."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.routes.deps import JobDep, StoreDep, blocking
from service.schemas import ErrorBody, Event, EventList

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/{job_id}/events", responses={404: {"model": ErrorBody}})
async def list_events(
    job: JobDep,
    store: StoreDep,
    after: Annotated[str, Query(pattern=r"^\d{1,20}-\d{1,20}$", description="Events after this id.")] = "0-0",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    """Events after `after`, oldest first; poll again with `last_id` to follow the job."""
    items = [Event(**event) for event in await blocking(store.events, job.id, after=after, count=limit)]
    return EventList(events=items, last_id=items[-1].id if items else after)
