"""Job status and the one guard that says which status changes are allowed."""

from __future__ import annotations

from enum import StrEnum

from darwinfront.core.errors import InvalidTransition


class JobStatus(StrEnum):
    """Where a job is in its life. `succeeded`, `failed` and `cancelled` are final."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled}),
    # running -> queued puts a job back when its driver was lost (lease lapsed) or is stopping (SIGTERM).
    JobStatus.running: frozenset(
        {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.queued}
    ),
}


def check_transition(old: JobStatus | str, new: JobStatus | str) -> None:
    """Raise `InvalidTransition` unless a job may go from `old` to `new`.

    Args:
        old: The current status.
        new: The wanted status.

    Raises:
        InvalidTransition: The change is not allowed (including any change out of a terminal state).
    """
    old, new = JobStatus(old), JobStatus(new)
    if new not in _ALLOWED.get(old, frozenset()):
        if old in TERMINAL:
            raise InvalidTransition(f"job is already {old.value}; {old.value} is final")
        raise InvalidTransition(f"a {old.value} job cannot become {new.value}")
