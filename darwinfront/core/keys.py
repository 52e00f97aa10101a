"""The Redis key schema: the only place that builds key strings. Every key starts with `df:`.

Only the job store's own modules in `darwinfront.core` import it (tests/test_boundaries.py checks); everything
else asks the store.
"""

from __future__ import annotations

PREFIX = "df:"


def job(job_id: str) -> str:
    """Hash: the job's fields (status, tenant, spec JSON, timestamps, error, driver)."""
    return f"{PREFIX}job:{job_id}"


def jobs_by_tenant(tenant: str) -> str:
    """Sorted set: a tenant's job ids scored by creation time (epoch seconds)."""
    return f"{PREFIX}tenant:{tenant}:jobs"


def jobs_by_status(tenant: str, status: str) -> str:
    """Sorted set: a tenant's job ids in one status, scored by creation time."""
    return f"{PREFIX}tenant:{tenant}:jobs:{status}"


def queue() -> str:
    """List: queued job ids; producers push on the left, drivers take from the right."""
    return f"{PREFIX}queue"


def claimed() -> str:
    """List: ids of jobs a driver has taken off the queue and not yet finished."""
    return f"{PREFIX}claimed"


def strays() -> str:
    """Hash: job id -> Redis time it was first seen in the claimed list without running (a claim cut short)."""
    return f"{PREFIX}strays"


def events(job_id: str) -> str:
    """Stream: the job's capped event log."""
    return f"{PREFIX}job:{job_id}:events"


def front(job_id: str) -> str:
    """String: JSON of the latest Pareto front snapshot."""
    return f"{PREFIX}job:{job_id}:front"


def progress(job_id: str) -> str:
    """String: JSON of the latest progress report."""
    return f"{PREFIX}job:{job_id}:progress"


def results(job_id: str) -> str:
    """Hash: candidate id -> configuration JSON."""
    return f"{PREFIX}job:{job_id}:results"


def artifacts(job_id: str) -> str:
    """Hash: candidate id -> exported artifact metadata JSON."""
    return f"{PREFIX}job:{job_id}:artifacts"


def scores(job_id: str) -> str:
    """Hash: candidate id -> JSON of its lm-eval scores per task (what `evaluate` jobs measured on it)."""
    return f"{PREFIX}job:{job_id}:scores"


def dense_scores(job_id: str) -> str:
    """Hash: evaluation settings key -> JSON of the dense model's lm-eval score of one task (the cache)."""
    return f"{PREFIX}job:{job_id}:dense-scores"


def checkpoint(job_id: str) -> str:
    """String: JSON `{generation, state}` of the latest search checkpoint."""
    return f"{PREFIX}job:{job_id}:checkpoint"


def cancel(job_id: str) -> str:
    """String: present when a cancel was requested; the driver polls it."""
    return f"{PREFIX}job:{job_id}:cancel"


def sensitivity(job_id: str) -> str:
    """String: JSON of a KV-precision job's per-layer, per-pair sensitivity table."""
    return f"{PREFIX}job:{job_id}:sensitivity"


def lease(job_id: str) -> str:
    """String with a TTL: the id of the driver running the job; it lapses when the driver stops renewing it."""
    return f"{PREFIX}job:{job_id}:lease"


def optuna_prefix(job_id: str) -> str:
    """Key prefix for Optuna's `JournalRedisBackend` of this job."""
    return f"{PREFIX}optuna:{job_id}:"


def idempotency(tenant: str, key: str) -> str:
    """String: the job id created under this tenant's idempotency key."""
    return f"{PREFIX}idem:{tenant}:{key}"


def jobs_by_status_pattern() -> str:
    """SCAN pattern of every tenant's per-status index (`jobs_by_status`); `status_of_index` reads its status."""
    return f"{PREFIX}tenant:*:jobs:*"


def status_of_index(key: str) -> str:
    """The status of a per-status index key (`jobs_by_status`): its last segment (a tenant holds no ':')."""
    return key.rsplit(":", 1)[1]


def evaluation_telemetry() -> str:
    """Hash the drivers update per evaluation: `count`, `failed`, `sum` (seconds), `le:<bound>` bucket counts."""
    return f"{PREFIX}telemetry:evaluations"


def evaluator_telemetry() -> str:
    """Hash: job id -> JSON `{evaluators, lost, at}`, the Ray evaluators its driver holds for it."""
    return f"{PREFIX}telemetry:evaluators"
