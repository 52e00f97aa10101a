"""Server-sent events: a job's event log, its state and its front, pushed as they change.

`GET /v1/jobs/{id}/stream` sends, in order:

- every job event after `after` (or the `Last-Event-ID` header) as `event: <kind>` with `id: <stream id>`;
- `event: job` with the job (`JobPublic`) whenever its status or progress changed;
- `event: front` with the front (`Front`) whenever a new snapshot was written;
- `event: end` once the job is final and everything before it was sent; then the stream closes.

The wait between changes is the store's `EventWaiter` (a blocking read of the job's event stream on an
asyncio client), so an idle follower holds no thread; the driver writes an event after every front and progress
update, so waking on events misses no change. A comment line every `HEARTBEAT_SECONDS` keeps proxies from
closing an idle stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from darwinfront.core.event_wait import EventWaiter
from darwinfront.core.status import TERMINAL
from darwinfront.core.store import JobStore
from service.routes.deps import JobDep, StoreDep, blocking
from service.schemas import ErrorBody, Front, JobPublic

router = APIRouter(prefix="/jobs", tags=["jobs"])

HEARTBEAT_SECONDS = 10.0
BATCH = 200
_EVENT_ID = r"^\d{1,19}-\d{1,19}$"  # 19 digits stay below 2**64, the most XREAD accepts


def sse(event: str, data: Any, *, event_id: str | None = None) -> str:
    """One server-sent event: `event`, optional `id`, and `data` as one line of JSON."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def _snapshot(store: JobStore, job_id: str) -> tuple[JobPublic, Front]:
    job = JobPublic.from_record(store.get(job_id))
    return job, Front(job_id=job_id, **store.get_scored_front(job_id))


async def follow(
    store: JobStore, waiter: EventWaiter, job_id: str, after: str, request: Request | None = None
) -> AsyncIterator[str]:
    """Yield the job's events after `after`, its state and front changes, until the job is final."""
    last, shown_job, shown_front = after, None, None
    while True:
        events = await blocking(store.events, job_id, after=last, count=BATCH)
        for event in events:
            yield sse(event["kind"], event, event_id=event["id"])
            last = event["id"]
        job, front = await blocking(_snapshot, store, job_id)
        if (text := job.model_dump_json()) != shown_job:
            shown_job = text
            yield sse("job", job.model_dump(mode="json"))
        if front.updated_at != shown_front:
            shown_front = front.updated_at
            yield sse("front", front.model_dump(mode="json"))
        if len(events) == BATCH:
            continue  # more events are waiting
        if job.status in TERMINAL:
            # The final status and its event are written together: read once more to send what came after.
            tail = await blocking(store.events, job_id, after=last, count=BATCH)
            if not tail:
                yield sse("end", {"status": job.status.value, "last_id": last})
                return
            continue
        if request is not None and await request.is_disconnected():
            return
        if not await waiter.wait(job_id, after=last, timeout=HEARTBEAT_SECONDS):
            yield ": keep-alive\n\n"


@router.get(
    "/{job_id}/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorBody}},
)
async def stream_job(
    job: JobDep,
    store: StoreDep,
    request: Request,
    after: Annotated[str, Query(pattern=_EVENT_ID, description="Send the events after this id.")] = "0-0",
    last_event_id: Annotated[str | None, Header(pattern=_EVENT_ID)] = None,
) -> StreamingResponse:
    """Follow a job live (server-sent events); `Last-Event-ID` or `after` resumes after a known event."""
    body = follow(store, request.app.state.event_waiter, job.id, last_event_id or after, request)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)
