"""Jobs: submit, list, read, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status

from service.etag import conditional
from service.quotas import Quota
from service.routes.deps import JobDep, SettingsDep, StoreDep, TenantDep, blocking
from service.schemas import ErrorBody, JobCreate, JobList, JobPublic
from service.settings import Settings
from service.status import JobStatus
from service.store import JobRecord, JobStore
from service.validation import validate_spec

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_OFFSET = 1_000_000_000  # Redis ranges take 64-bit integers; no tenant has this many jobs
_NOT_FOUND = {404: {"model": ErrorBody, "description": "No such job for this API key."}}
IdempotencyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
]


def _invalid(field: str, message: str) -> HTTPException:
    detail = {"code": "invalid_request", "field": field, "message": f"{field}: {message}"}
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


def _validate_and_create(store: JobStore, settings: Settings, tenant: str, body: JobCreate, key: str | None):
    spec = body.spec()
    validate_spec(spec, settings)  # looks at the file system
    return store.create(tenant, spec.model_dump(mode="json"), idempotency_key=key,
                        planned=spec.planned_evaluations(), quota=Quota.from_settings(settings))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        400: {"model": ErrorBody, "description": "The body cannot be read (not UTF-8)."},
        422: {"model": ErrorBody, "description": "The spec is invalid (the error names the field), or the "
              "tenant's active jobs and this one together plan more evaluations than allowed "
              "(`budget_exceeded`)."},
        429: {"model": ErrorBody, "description": "The tenant has as many queued and running jobs as allowed "
              "(`too_many_active_jobs`); retry when one ends."},
    },
)
async def create_job(
    body: JobCreate,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    idempotency_header: IdempotencyHeader = None,
) -> JobPublic:
    """Submit a compression job. It is queued; a driver picks it up.

    An idempotency key (the `Idempotency-Key` header or the `idempotency_key` field) makes a retry return the
    job the first request created.
    """
    if body.idempotency_key and idempotency_header and body.idempotency_key != idempotency_header:
        raise _invalid("idempotency_key", "differs from the Idempotency-Key header")
    key = body.idempotency_key or idempotency_header
    record: JobRecord = await blocking(_validate_and_create, store, settings, tenant, body, key)
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return JobPublic.from_record(record)


@router.get("")
async def list_jobs(
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, description="Page size, at most the server's max_page_size.")] = 50,
) -> JobList:
    """The caller's jobs, newest first, optionally only those in one status."""
    if limit > settings.max_page_size:
        raise _invalid("limit", f"at most {settings.max_page_size}, got {limit}")
    records, total = await blocking(store.list, tenant, status=status_, offset=offset, limit=limit)
    return JobList(items=[JobPublic.from_record(r) for r in records], total=total, offset=offset, limit=limit)


@router.get("/{job_id}", responses={**_NOT_FOUND, 304: {"description": "Unchanged since the `If-None-Match` tag."}})
async def get_job(job: JobDep, request: Request, response: Response) -> JobPublic:
    """One job: its status, spec and progress. Tagged with an ETag; `If-None-Match` gets a 304 if unchanged."""
    return conditional(request, response, JobPublic.from_record(job))


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**_NOT_FOUND, 409: {"model": ErrorBody, "description": "The job has already finished."}},
)
async def cancel_job(job: JobDep, store: StoreDep) -> JobPublic:
    """Cancel a job: a queued one at once; a running one stays running until its driver sees the request."""

    def cancel() -> JobRecord:
        store.request_cancel(job.id)
        return store.get(job.id)

    return JobPublic.from_record(await blocking(cancel))
