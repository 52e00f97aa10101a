"""Score a finished job's candidate with lm-evaluation-harness, as a follow-up job; read the scores."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from service.routes.candidates import CandidateId
from service.routes.deps import JobDep, SettingsDep, StoreDep, TenantDep, blocking
from service.routes.jobs import _CREATE_ERRORS, IdempotencyHeader, ParentId, create_followup
from service.schemas import ErrorBody, EvaluateCreate, JobPublic

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post(
    "/{job_id}/candidates/{candidate_id}/evaluate", status_code=status.HTTP_201_CREATED, responses=_CREATE_ERRORS
)
async def evaluate_candidate(
    job_id: ParentId,
    candidate_id: CandidateId,
    body: EvaluateCreate,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    idempotency_header: IdempotencyHeader = None,
) -> JobPublic:
    """Score a candidate of a finished structured_prune, posttrain or kv_precision job on lm_eval tasks.

    The same as submitting `{"method": "evaluate", "evaluate": {"job": job_id, "candidate": candidate_id,
    "tasks": [...], ...}}`: the follow-up job is queued and runs like any other. The dense model's scores are
    computed once per parent job and settings and reused. When it succeeds, the scores (per task: metric,
    value, stderr, the dense model's beside them) are in the parent's front (`scores` of the point), at
    `/v1/jobs/{job_id}/candidates/{candidate_id}/scores`, and in the follow-up's front and result. A task name
    lm_eval does not know fails the job with the names it has.
    """
    return await create_followup("evaluate", job_id, candidate_id, body, tenant, store, settings, response,
                                 idempotency_header)


@router.get("/{job_id}/candidates/{candidate_id}/scores", responses={404: {"model": ErrorBody}})
async def get_scores(job: JobDep, candidate_id: CandidateId, store: StoreDep) -> dict[str, dict]:
    """The candidate's lm-eval scores, per task (empty until an evaluate job of it succeeds)."""

    def read() -> dict[str, dict]:
        store.get_result(job.id, candidate_id)  # CandidateNotFound -> 404
        return store.get_scores(job.id).get(candidate_id, {})

    return await blocking(read)

