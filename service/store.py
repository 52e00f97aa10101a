"""The Redis job store: jobs, their queue, progress, events, fronts, results, artifacts and checkpoints.

The API writes jobs and reads everything; the driver claims jobs and writes their progress. Every multi-key
write is one MULTI/EXEC transaction, and a status change re-reads the status under WATCH, so two writers
cannot both move a job. Key strings come from `service.keys` only; JSON payloads are stored as JSON strings.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import redis

from darwinfront.errors import CandidateNotFound, InvalidTransition, JobNotFound
from service import keys
from service.leases import Leases
from service.status import TERMINAL, JobStatus, check_transition

EVENTS_MAXLEN = 1000
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


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


class JobStore(Leases):
    """Jobs and everything they produce, kept in Redis.

    Args:
        client: A redis-py client created with `decode_responses=True`.
        events_maxlen: Approximate cap of each job's event stream.
    """

    def __init__(self, client: redis.Redis, *, events_maxlen: int = EVENTS_MAXLEN):
        self._r = client
        self._events_maxlen = events_maxlen

    # ---- jobs -------------------------------------------------------------------------------------------

    def create(self, tenant: str, spec: dict[str, Any], *, idempotency_key: str | None = None) -> JobRecord:
        """Store a new queued job and push it on the queue.

        Args:
            tenant: Owner of the job.
            spec: The validated job spec as a JSON-safe dict.
            idempotency_key: When given, a second create with the same key for the same tenant returns the
                job the first one made instead of making another.

        Returns:
            The stored job.
        """
        if not _TENANT.match(tenant):
            raise ValueError(f"tenant {tenant!r} must be 1-64 letters, digits, '_', '.' or '-'")
        job_id = uuid.uuid4().hex[:16]
        spec_json = _dump(spec)
        if idempotency_key is None:
            pipe = self._r.pipeline(transaction=True)
            self._queue_new(pipe, job_id, tenant, spec_json)
            pipe.execute()
            return self.get(job_id)
        idem = keys.idempotency(tenant, idempotency_key)

        def write(pipe: redis.client.Pipeline) -> str:
            existing = pipe.get(idem)
            if existing:
                return existing
            pipe.multi()
            pipe.set(idem, job_id)
            self._queue_new(pipe, job_id, tenant, spec_json)
            return job_id

        return self.get(self._r.transaction(write, idem, value_from_callable=True))

    def _queue_new(self, pipe: redis.client.Pipeline, job_id: str, tenant: str, spec_json: str) -> None:
        now = datetime.now(UTC)
        score = now.timestamp()
        pipe.hset(keys.job(job_id), mapping={
            "id": job_id, "tenant": tenant, "status": JobStatus.queued.value, "spec": spec_json,
            "created_at": now.isoformat(),
        })
        pipe.zadd(keys.jobs_by_tenant(tenant), {job_id: score})
        pipe.zadd(keys.jobs_by_status(tenant, JobStatus.queued.value), {job_id: score})
        pipe.lpush(keys.queue(), job_id)
        self._queue_event(pipe, job_id, JobStatus.queued.value, {"status": JobStatus.queued.value})

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
        now = _now()
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
        self._queue_event(pipe, job_id, new.value, data)  # the event kind is the new status

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
            pipe.set(keys.cancel(job_id), _now())
            if old is JobStatus.queued:
                self._queue_move(pipe, job_id, current, JobStatus.cancelled)
                return JobStatus.cancelled
            self._queue_event(pipe, job_id, "cancel_requested", {})
            return old

        return self._r.transaction(write, keys.job(job_id), value_from_callable=True)

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was requested for this job (the driver polls this)."""
        return bool(self._r.exists(keys.cancel(job_id)))

    # ---- what a running job produces ----------------------------------------------------------------------

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Replace the progress report (generation, generations, evaluations, planned, best)."""
        self._r.set(keys.progress(job_id), _dump(progress))

    def append_event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        """Append an event to the job's capped stream; returns its stream id."""
        return self._r.xadd(keys.events(job_id), self._event_fields(kind, data),
                            maxlen=self._events_maxlen, approximate=True)

    def _queue_event(self, pipe: redis.client.Pipeline, job_id: str, kind: str, data: dict[str, Any]) -> None:
        pipe.xadd(keys.events(job_id), self._event_fields(kind, data),
                  maxlen=self._events_maxlen, approximate=True)

    @staticmethod
    def _event_fields(kind: str, data: dict[str, Any]) -> dict[str, str]:
        return {"time": _now(), "kind": kind, "data": _dump(data)}

    def events(self, job_id: str, after: str = "0-0", count: int = 100) -> list[dict[str, Any]]:
        """Up to `count` events after stream id `after`, oldest first: dicts of id, time, kind, data."""
        entries = self._r.xrange(keys.events(job_id), min=f"({after}", max="+", count=count)
        return [
            {"id": entry_id, "time": f["time"], "kind": f["kind"], "data": json.loads(f["data"])}
            for entry_id, f in entries
        ]

    def set_front(self, job_id: str, points: list[dict[str, Any]], *, generation: int | None = None) -> None:
        """Replace the front snapshot.

        Args:
            job_id: The job.
            points: Dicts of candidate_id, objectives (e.g. {"kl": .., "params": ..}), target, generation.
            generation: The search generation of the snapshot; default the largest among the points.
        """
        if generation is None:
            generations = [p["generation"] for p in points if p.get("generation") is not None]
            generation = max(generations, default=None)
        snapshot = {"points": points, "updated_at": _now(), "generation": generation}
        self._r.set(keys.front(job_id), _dump(snapshot))

    def get_front(self, job_id: str) -> dict[str, Any]:
        """The latest front snapshot: {points, updated_at, generation} (empty before the first one)."""
        raw = self._r.get(keys.front(job_id))
        return json.loads(raw) if raw else {"points": [], "updated_at": None, "generation": None}

    def put_result(self, job_id: str, candidate_id: str, configuration: dict[str, Any]) -> None:
        """Store a candidate's configuration document."""
        self._r.hset(keys.results(job_id), candidate_id, _dump(configuration))

    def get_result(self, job_id: str, candidate_id: str) -> dict[str, Any]:
        """A candidate's configuration; raises `CandidateNotFound` if none was stored."""
        raw = self._r.hget(keys.results(job_id), candidate_id)
        if raw is None:
            raise CandidateNotFound(f"job {job_id!r} has no candidate {candidate_id!r}")
        return json.loads(raw)

    def result_ids(self, job_id: str) -> list[str]:
        """Ids of the candidates with a stored configuration, sorted."""
        return sorted(self._r.hkeys(keys.results(job_id)))

    def put_artifact(self, job_id: str, candidate_id: str, meta: dict[str, Any]) -> None:
        """Record an exported model archive.

        Args:
            job_id: The job.
            candidate_id: The exported candidate.
            meta: path (relative to `<data_dir>/artifacts/`, inside the job's folder: `<job_id>/<file>`),
                size (bytes), sha256 (hex).
        """
        path = meta.get("path")
        parts = PurePosixPath(path) if isinstance(path, str) else None
        if parts is None or parts.is_absolute() or ".." in parts.parts or parts.parts[:1] != (job_id,):
            raise ValueError(f"artifact path {path!r} must be relative to the artifacts directory and inside "
                             f"the job's folder, like '{job_id}/<file>'")
        self._r.hset(keys.artifacts(job_id), candidate_id, _dump(meta))

    def get_artifact(self, job_id: str, candidate_id: str) -> dict[str, Any]:
        """An exported model's metadata; raises `CandidateNotFound` if the candidate was not exported."""
        raw = self._r.hget(keys.artifacts(job_id), candidate_id)
        if raw is None:
            raise CandidateNotFound(f"candidate {candidate_id!r} of job {job_id!r} has no exported model")
        return json.loads(raw)

    def save_checkpoint(self, job_id: str, generation: int, state: dict[str, Any]) -> None:
        """Replace the search checkpoint."""
        self._r.set(keys.checkpoint(job_id), _dump({"generation": generation, "state": state}))

    def load_checkpoint(self, job_id: str) -> tuple[int, dict[str, Any]] | None:
        """The latest checkpoint as (generation, state), or None if none was saved."""
        raw = self._r.get(keys.checkpoint(job_id))
        if raw is None:
            return None
        saved = json.loads(raw)
        return saved["generation"], saved["state"]

    def ping(self) -> bool:
        """True when Redis answers (raises redis.ConnectionError when it does not)."""
        return bool(self._r.ping())
