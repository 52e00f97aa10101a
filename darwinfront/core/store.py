"""The Redis job store: jobs, their queue and status (here), what they produce (`darwinfront.core.outputs`), driver
leases (`darwinfront.core.leases`), counts across tenants (`darwinfront.core.census`), and `connect()`, the one
way the API and the drivers open Redis.

The store is the only reader and writer of Redis keys. Beside `JobStore` it has three small modules of its own:
`darwinfront.core.telemetry` (what the drivers measure for `/metrics`), `darwinfront.core.event_wait` (the SSE
stream's blocking wait for a job's next event, on an asyncio client) and `darwinfront.core.studies` (each job's
Optuna journal). Everything else, in the HTTP edge, the workers and the CLI, asks them.

The API writes jobs and reads everything; the driver claims jobs and writes their progress. Every multi-key
write is one MULTI/EXEC transaction whose function re-reads under WATCH what it checks, so two writers cannot
both move a job, a quota holds under concurrent submissions, and a transaction retried after a lost
connection does not write twice. Key strings come from `darwinfront.core.keys` only; JSON payloads are JSON strings.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from darwinfront.core import keys
from darwinfront.core.census import JobCensus
from darwinfront.core.errors import InvalidTransition, JobNotFound
from darwinfront.core.leases import Leases
from darwinfront.core.outputs import EVENTS_MAXLEN, JobOutputs, queue_event, to_json, utc_now
from darwinfront.core.quotas import Quota
from darwinfront.core.status import TERMINAL, JobStatus, check_transition

_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ACTIVE = (JobStatus.queued, JobStatus.running)


def connect(
    url: str, *, retries: int = 10, backoff_base: float = 0.05, backoff_cap: float = 1.0,
    socket_timeout: float = 5.0,
) -> redis.Redis:
    """The Redis client the API and the drivers use: it rides out a brief Redis outage (a restart).

    A command that fails with a connection error or a timeout is sent again after an exponential backoff
    (`backoff_base` doubling up to `backoff_cap` seconds), up to `retries` times (about 7 s in all with the
    defaults) on a fresh connection; idle connections are checked with a PING before reuse. Transactions that
    WATCH keys are not resent blindly: redis-py turns the failure into a WatchError, and the store's
    transaction functions run again from the start, re-reading what they check, so a write whose reply was
    lost is found and not made twice. Nothing connects until the first command.

    Args:
        url: `redis://`, `rediss://` or `unix://` URL.
        retries: Attempts after the first; 0 fails at once.
        backoff_base: First pause, in seconds.
        backoff_cap: Longest pause, in seconds.
        socket_timeout: Seconds to wait for a reply (a timeout is retried too); must exceed the longest
            blocking call (a driver's claim blocks 1 s).

    Returns:
        A client with `decode_responses=True`.
    """
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=backoff_cap, base=backoff_base), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        health_check_interval=15,
    )


@dataclass(frozen=True)
class JobRecord:
    """One job as stored; timestamps are UTC ISO-8601 strings."""

    id: str
    tenant: str
    status: JobStatus
    spec: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    driver: str | None = None


def _record(fields: dict[str, str], progress: str | None) -> JobRecord:
    return JobRecord(
        id=fields["id"],
        tenant=fields["tenant"],
        status=JobStatus(fields["status"]),
        spec=json.loads(fields["spec"]),
        progress=json.loads(progress) if progress else {},
        error=fields.get("error"),
        created_at=fields["created_at"],
        started_at=fields.get("started_at"),
        finished_at=fields.get("finished_at"),
        driver=fields.get("driver"),
    )


class JobStore(Leases, JobOutputs, JobCensus):
    """Jobs and everything they produce, kept in Redis.

    Args:
        client: A redis-py client created with `decode_responses=True`.
        events_maxlen: Approximate cap of each job's event stream.
    """

    def __init__(self, client: redis.Redis, *, events_maxlen: int = EVENTS_MAXLEN):
        self._r = client
        self._events_maxlen = events_maxlen
        self._probe: redis.Redis | None = None

    # ---- jobs -------------------------------------------------------------------------------------------

    def create(
        self, tenant: str, spec: dict[str, Any], *, idempotency_key: str | None = None, planned: int = 0,
        quota: Quota | None = None,
    ) -> JobRecord:
        """Store a new queued job and push it on the queue.

        Args:
            tenant: Owner of the job.
            spec: The validated job spec as a JSON-safe dict.
            idempotency_key: When given, a second create with the same key for the same tenant returns the
                job the first one made instead of making another (and is not counted against the quota).
            planned: Candidate evaluations the job plans, stored with it for the quota.
            quota: When given, checked against the tenant's queued and running jobs in the same transaction.

        Returns:
            The stored job.

        Raises:
            TooManyActiveJobs, EvaluationBudgetExceeded: The quota refuses the job; nothing was written.
        """
        if not _TENANT.match(tenant):
            raise ValueError(f"tenant {tenant!r} must be 1-64 letters, digits, '_', '.' or '-'")
        job_id = uuid.uuid4().hex[:16]
        spec_json = to_json(spec)
        idem = keys.idempotency(tenant, idempotency_key) if idempotency_key is not None else None
        watched = [keys.job(job_id)]
        if idem is not None:
            watched.append(idem)
        if quota is not None:
            watched += [keys.jobs_by_status(tenant, status.value) for status in _ACTIVE]

        def write(pipe: redis.client.Pipeline) -> str:
            if idem is not None and (existing := pipe.get(idem)):
                return existing
            if pipe.exists(keys.job(job_id)):
                return job_id  # an earlier attempt wrote it and its reply was lost; don't write it twice
            if quota is not None:
                quota.check(self._active_planned(pipe, tenant), planned)
            pipe.multi()
            if idem is not None:
                pipe.set(idem, job_id)
            self._queue_new(pipe, job_id, tenant, spec_json, planned)
            return job_id

        return self.get(self._r.transaction(write, *watched, value_from_callable=True))

    def _active_planned(self, pipe: redis.client.Pipeline, tenant: str) -> list[int]:
        """Planned evaluations of each queued or running job of the tenant (read under the caller's WATCH)."""
        ids = [job_id for status in _ACTIVE for job_id in pipe.zrange(keys.jobs_by_status(tenant, status.value), 0, -1)]
        reads = self._r.pipeline(transaction=False)  # a job's planned count never changes: no need to watch it
        for job_id in ids:
            reads.hget(keys.job(job_id), "planned")
        return [int(value or 0) for value in reads.execute()]

    def _queue_new(
        self, pipe: redis.client.Pipeline, job_id: str, tenant: str, spec_json: str, planned: int
    ) -> None:
        now = datetime.now(UTC)
        score = now.timestamp()
        pipe.hset(keys.job(job_id), mapping={
            "id": job_id, "tenant": tenant, "status": JobStatus.queued.value, "spec": spec_json,
            "created_at": now.isoformat(), "planned": planned,
        })
        pipe.zadd(keys.jobs_by_tenant(tenant), {job_id: score})
        pipe.zadd(keys.jobs_by_status(tenant, JobStatus.queued.value), {job_id: score})
        pipe.lpush(keys.queue(), job_id)
        queue_event(pipe, self._events_maxlen, job_id, JobStatus.queued.value, {"status": JobStatus.queued.value})

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job `job_id`; with `tenant`, only if that tenant owns it.

        Raises:
            JobNotFound: No such job, or it belongs to another tenant.
        """
        pipe = self._r.pipeline(transaction=False)
        pipe.hgetall(keys.job(job_id))
        pipe.get(keys.progress(job_id))
        fields, progress = pipe.execute()
        if not fields or (tenant is not None and fields.get("tenant") != tenant):
            raise JobNotFound(f"no job {job_id!r}")
        return _record(fields, progress)

    def list(
        self, tenant: str, *, status: JobStatus | str | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[list[JobRecord], int]:
        """A page of the tenant's jobs, newest first, and how many there are in all."""
        if offset < 0 or limit < 1:
            raise ValueError(f"offset must be >= 0 and limit >= 1, got offset={offset}, limit={limit}")
        by_status = status is not None
        index = keys.jobs_by_status(tenant, JobStatus(status).value) if by_status else keys.jobs_by_tenant(tenant)
        pipe = self._r.pipeline(transaction=False)
        pipe.zcard(index)
        pipe.zrevrange(index, offset, offset + limit - 1)
        total, ids = pipe.execute()
        pipe = self._r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
            pipe.get(keys.progress(job_id))
        replies = pipe.execute()
        records = [_record(f, p) for f, p in zip(replies[::2], replies[1::2], strict=True) if f]
        return records, total

    # ---- status -----------------------------------------------------------------------------------------

    def claim(self, driver_id: str, timeout: float = 1.0, *, lease_seconds: float | None = None) -> str | None:
        """Take the oldest queued job and mark it running for `driver_id`.

        Blocks up to `timeout` seconds for a job (0 does not block). Jobs cancelled while they sat on the
        queue are dropped, not returned. With `lease_seconds` the driver also gets the job's lease, which it
        must renew (`renew_lease`) or lose the job to `requeue_expired`.

        Returns:
            The claimed job id, or None when none came in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining > 0:
                job_id = self._r.blmove(keys.queue(), keys.claimed(), remaining, "RIGHT", "LEFT")
            else:
                job_id = self._r.lmove(keys.queue(), keys.claimed(), "RIGHT", "LEFT")
            if job_id is None:
                return None
            try:
                self._transition(job_id, JobStatus.running, driver=driver_id)
                if lease_seconds is not None:
                    self.grant_lease(job_id, driver_id, lease_seconds)
                return job_id
            except (InvalidTransition, JobNotFound):
                self._r.lrem(keys.claimed(), 0, job_id)  # cancelled or gone while queued

    def set_status(self, job_id: str, status: JobStatus | str, *, error: str | None = None) -> None:
        """Move the job to `status` if the state machine allows it; stamps started_at / finished_at.

        Every status change (and the creation) appends an event whose kind is the new status, in the same
        transaction, so the event log never disagrees with the job.

        Raises:
            JobNotFound: No such job.
            InvalidTransition: The change is not allowed (terminal states are final).
        """
        self._transition(job_id, JobStatus(status), error=error)

    def _transition(
        self, job_id: str, new: JobStatus, *, error: str | None = None, driver: str | None = None
    ) -> None:
        def write(pipe: redis.client.Pipeline) -> None:
            current = self._read_status(pipe, job_id)
            check_transition(current[0], new)
            pipe.multi()
            self._queue_move(pipe, job_id, current, new, error=error, driver=driver)

        self._r.transaction(write, keys.job(job_id))

    def _read_status(self, pipe: redis.client.Pipeline, job_id: str) -> tuple[JobStatus, str, str]:
        status, tenant, created = pipe.hmget(keys.job(job_id), "status", "tenant", "created_at")
        if status is None:
            raise JobNotFound(f"no job {job_id!r}")
        return JobStatus(status), tenant, created

    def _queue_move(
        self, pipe: redis.client.Pipeline, job_id: str, current: tuple[JobStatus, str, str], new: JobStatus,
        *, error: str | None = None, driver: str | None = None,
    ) -> None:
        old, tenant, created = current
        now = utc_now()
        changes = {"status": new.value}
        if new is JobStatus.running:
            changes["started_at"] = now
            if driver is not None:
                changes["driver"] = driver
        if new in TERMINAL:
            changes["finished_at"] = now
        if error is not None:
            changes["error"] = error
        job_key = keys.job(job_id)
        pipe.hset(job_key, mapping=changes)
        if new is JobStatus.queued:
            pipe.hdel(job_key, "driver", "started_at")
        score = datetime.fromisoformat(created).timestamp()
        pipe.zrem(keys.jobs_by_status(tenant, old.value), job_id)
        pipe.zadd(keys.jobs_by_status(tenant, new.value), {job_id: score})
        if old is JobStatus.running:
            pipe.lrem(keys.claimed(), 0, job_id)
            pipe.delete(keys.lease(job_id))
        if old is JobStatus.queued and new is JobStatus.cancelled:
            pipe.lrem(keys.queue(), 0, job_id)
        if new is JobStatus.queued:
            pipe.rpush(keys.queue(), job_id)  # the right end: taken next
        data = {"status": new.value} if error is None else {"status": new.value, "error": error}
        queue_event(pipe, self._events_maxlen, job_id, new.value, data)  # the event kind is the new status

    def request_cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued job at once, or ask the driver of a running job to stop.

        Returns:
            The status after the request: `cancelled` for a queued job, `running` for a running one (the
            driver sees `cancel_requested` and finishes it as cancelled).

        Raises:
            JobNotFound: No such job.
            InvalidTransition: The job has already finished.
        """

        def write(pipe: redis.client.Pipeline) -> JobStatus:
            current = self._read_status(pipe, job_id)
            old = current[0]
            if old in TERMINAL:
                raise InvalidTransition(f"job {job_id!r} is already {old.value}; it cannot be cancelled")
            pipe.multi()
            pipe.set(keys.cancel(job_id), utc_now())
            if old is JobStatus.queued:
                self._queue_move(pipe, job_id, current, JobStatus.cancelled)
                return JobStatus.cancelled
            queue_event(pipe, self._events_maxlen, job_id, "cancel_requested", {})
            return old

        return self._r.transaction(write, keys.job(job_id), value_from_callable=True)

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was requested for this job (the driver polls this)."""
        return bool(self._r.exists(keys.cancel(job_id)))

    def ping(self) -> bool:
        """True when Redis answers now (raises redis.ConnectionError when it does not).

        The ping does not retry, so a readiness probe learns of an outage at once, while the store's other
        calls ride it out.
        """
        if self._probe is None:
            pool = self._r.connection_pool
            kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
            self._probe = redis.Redis(connection_pool=redis.ConnectionPool(pool.connection_class, **kwargs))
        return bool(self._probe.ping())
