"""Jobs: submit, list, read, cancel; and post-train a finished job's candidate as a follow-up job."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from darwinfront.core.errors import CandidateNotFound, JobNotFound
from darwinfront.core.joint_spec import JointJobSpec
from darwinfront.core.methods import method_of, parse_spec
from darwinfront.core.quotas import Quota
from darwinfront.core.settings import Settings
from darwinfront.core.spec import JobSpec
from darwinfront.core.status import TERMINAL, JobStatus
from darwinfront.core.store import JobRecord, JobStore
from service.etag import conditional
from service.routes.candidates import CandidateId
from service.routes.deps import JobDep, SettingsDep, StoreDep, TenantDep, blocking
from service.schemas import ErrorBody, JobCreate, JobList, JobPublic, PosttrainCreate
from service.validation import validate_spec

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_OFFSET = 1_000_000_000  # Redis ranges take 64-bit integers; no tenant has this many jobs
_NOT_FOUND = {404: {"model": ErrorBody, "description": "No such job for this API key."}}
IdempotencyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
]
ParentId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_CREATE_ERRORS = {
    400: {"model": ErrorBody, "description": "The body cannot be read (not UTF-8)."},
    404: {"model": ErrorBody, "description": "posttrain, evaluate: no such parent job for this API key, or it has "
          "no exported candidate of that id (the error names the field)."},
    409: {"model": ErrorBody, "description": "posttrain, evaluate: the parent job has not finished exporting its "
          "candidates yet (`job_not_finished`)."},
    422: {"model": ErrorBody, "description": "The spec is invalid (the error names the field), the posttrain "
          "parent is not a structured_prune job (`not_a_prune_job`), the evaluate parent is of a method it does "
          "not take (`unsupported_parent`), or the tenant's active jobs and this one together plan more "
          "evaluations than allowed (`budget_exceeded`)."},
    429: {"model": ErrorBody, "description": "The tenant has as many queued and running jobs as allowed "
          "(`too_many_active_jobs`); retry when one ends."},
}


def _invalid(field: str, message: str) -> HTTPException:
    detail = {"code": "invalid_request", "field": field, "message": f"{field}: {message}"}
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


def _refuse(code: int, kind: str, field: str, message: str) -> HTTPException:
    return HTTPException(code, detail={"code": kind, "field": field, "message": f"{field}: {message}"})


def _parse(document: dict) -> JobSpec:
    """`parse_spec` for a request body: a bad field is a 422 naming it (`prune.targets.0`)."""
    try:
        return parse_spec(document)
    except ValidationError as exc:
        raise _body_errors(exc) from None


def _body_errors(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])


# a follow-up method's spec section, the methods its parent may have, and what it does to a candidate
FOLLOWUPS = {"posttrain": (("structured_prune",), "post-trained"),
             "evaluate": (("structured_prune", "posttrain", "kv_precision"), "evaluated")}


def resolve_parent(
    store: JobStore, tenant: str, spec: JobSpec, fields: tuple[str, str] | None = None
) -> JobSpec:
    """The follow-up `spec` (posttrain, evaluate) with its parent job's model, data and seed (and resources,
    unless given) filled in.

    Args:
        store: The job store.
        tenant: The caller; the parent must be one of its jobs.
        spec: A validated spec of a follow-up method (a key of `FOLLOWUPS`).
        fields: How errors name the parent job and the candidate (default the body fields `<method>.job` and
            `<method>.candidate`; the route gives its path parameters).

    Raises:
        HTTPException: 404 for an unknown parent or candidate; 422 for a parent of a method the follow-up does
            not take, or a model, data or seed that differs from the parent's; 409 while the parent has not yet
            exported its candidates.
    """
    section = spec.method
    parents, verb = FOLLOWUPS[section]
    job_field, candidate_field = fields or (f"{section}.job", f"{section}.candidate")
    options = getattr(spec, section)
    try:
        parent = store.get(options.job, tenant)
    except JobNotFound:
        raise _refuse(404, "job_not_found", job_field, f"no job {options.job!r}") from None
    method = method_of(parent.spec).name
    if method not in parents:
        raise _refuse(422, "not_a_prune_job" if parents == ("structured_prune",) else "unsupported_parent",
                      job_field, f"job {parent.id!r} is a {method} job; only the candidates of a "
                      f"{' or '.join(parents)} job can be {verb}")
    try:
        store.get_result(parent.id, options.candidate)
    except CandidateNotFound:
        if parent.status not in TERMINAL:
            raise _refuse(409, "job_not_finished", candidate_field, f"job {parent.id!r} is {parent.status.value};"
                          f" its front candidates are exported when it succeeds: {section} one then") from None
        raise _refuse(404, "candidate_not_found", candidate_field, f"job {parent.id!r} has no exported "
                      f"candidate {options.candidate!r} (the front points of a succeeded job have one)") from None
    parent_spec = parse_spec(parent.spec)
    inherited = {"model": parent_spec.model, "data": parent_spec.data, "seed": parent_spec.seed}
    for name, value in inherited.items():
        if name in spec.model_fields_set and getattr(spec, name) != value:
            raise _invalid(name, f"a {section} job uses its parent job's; leave it out")
    if "resources" not in spec.model_fields_set:
        inherited["resources"] = parent_spec.resources
    return _parse({**spec.model_dump(exclude_unset=True), **inherited})


def check_seed_jobs(store: JobStore, tenant: str, spec: JointJobSpec) -> None:
    """Each of a joint spec's `joint.seed_jobs` is a finished structured_prune or kv_precision job of the tenant on
    the same model; else a 404 / 409 / 422 naming `joint.seed_jobs.<i>`."""
    for i, job_id in enumerate(spec.joint.seed_jobs):
        field = f"joint.seed_jobs.{i}"
        try:
            seed = store.get(job_id, tenant)
        except JobNotFound:
            raise _refuse(404, "job_not_found", field, f"no job {job_id!r} for this API key") from None
        method = method_of(seed.spec).name
        if method not in ("structured_prune", "kv_precision"):
            raise _refuse(422, "not_a_seed_job", field, f"job {job_id!r} is a {method} job; seeds come from "
                          "structured_prune and kv_precision jobs")
        if seed.status != JobStatus.succeeded:
            raise _refuse(409, "job_not_finished", field, f"job {job_id!r} is {seed.status.value}; seed from a "
                          "succeeded job")
        if seed.spec["model"]["source"] != spec.model.source:
            raise _refuse(422, "other_model", field, f"job {job_id!r} searched {seed.spec['model']['source']}, "
                          f"not {spec.model.source}")


def _validate_and_create(
    store: JobStore, settings: Settings, tenant: str, spec: JobSpec, key: str | None,
    fields: tuple[str, str] | None = None,
) -> JobRecord:
    if spec.method in FOLLOWUPS:
        spec = resolve_parent(store, tenant, spec, fields)
    if isinstance(spec, JointJobSpec):
        check_seed_jobs(store, tenant, spec)
    validate_spec(spec, settings)  # looks at the file system
    return store.create(tenant, spec.model_dump(mode="json"), idempotency_key=key,
                        planned=spec.planned_evaluations(), quota=Quota.from_settings(settings))


@router.post("", status_code=status.HTTP_201_CREATED, responses=_CREATE_ERRORS)
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
    try:
        spec, key = body.parse()
    except ValidationError as exc:
        raise _body_errors(exc) from None
    if key and idempotency_header and key != idempotency_header:
        raise _invalid("idempotency_key", "differs from the Idempotency-Key header")
    key = key or idempotency_header
    record: JobRecord = await blocking(_validate_and_create, store, settings, tenant, spec, key)
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return JobPublic.from_record(record)


@router.post(
    "/{job_id}/candidates/{candidate_id}/posttrain", status_code=status.HTTP_201_CREATED, responses=_CREATE_ERRORS
)
async def posttrain_candidate(
    job_id: ParentId,
    candidate_id: CandidateId,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    body: PosttrainCreate | None = None,
    idempotency_header: IdempotencyHeader = None,
) -> JobPublic:
    """Post-train a candidate of a finished structured_prune job on more tokens, as a follow-up job.

    The same as submitting `{"method": "posttrain", "posttrain": {"job": job_id, "candidate": candidate_id,
    ...}}`: the follow-up job is queued and runs like any other (status, events, cancel, quotas). It starts from
    the candidate's exported weights and trains the sliced model, so what was pruned stays pruned; its result
    is stored under the same candidate id (`/v1/jobs/{follow-up}/candidates/{candidate_id}/config`, `/model`).
    The body's options are all optional; model, data and seed are the parent's, and so are the resources
    unless given.
    """
    body = body or PosttrainCreate()
    return await create_followup("posttrain", job_id, candidate_id, body, tenant, store, settings, response,
                                 idempotency_header)


async def create_followup(
    method: str, job_id: str, candidate_id: str, body, tenant: str, store: JobStore, settings: Settings,
    response: Response,
    idempotency_header: str | None,
) -> JobPublic:
    """Queue a follow-up job of `method` on a parent's candidate from a route's body (its options, plus `name`,
    `resources` and `idempotency_key`), as if `{"method": method, method: {..., "job", "candidate"}}` were
    submitted; errors in the parent's path parameters name `job_id` / `candidate_id`."""
    if body.idempotency_key and idempotency_header and body.idempotency_key != idempotency_header:
        raise _invalid("idempotency_key", "differs from the Idempotency-Key header")
    options = body.model_dump(exclude={"name", "resources", "idempotency_key"}, exclude_unset=True)
    document = {"method": method, method: {**options, "job": job_id, "candidate": candidate_id}}
    document |= body.model_dump(include={"name", "resources"}, exclude_none=True)
    key = body.idempotency_key or idempotency_header
    spec = _parse(document)
    record = await blocking(_validate_and_create, store, settings, tenant, spec, key, ("job_id", "candidate_id"))
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
