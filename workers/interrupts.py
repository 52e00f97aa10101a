"""Why a job stops early: raised at a job's safe points (between evaluations, generations or steps) and handled
by the driver."""

from __future__ import annotations

import threading

from darwinfront.core.store import JobStore


class Cancelled(Exception):
    """The user asked to cancel; the job ends `cancelled` with its partial front kept."""


class LeaseLost(Exception):
    """Another driver took the job over (our lease lapsed and the job was requeued); stop touching it."""


class Stopping(Exception):
    """The driver is shutting down (SIGTERM / SIGINT); the job goes back to the queue with what it recorded, and
    the next driver resumes it from its checkpoint and recorded candidates."""


def check_interrupts(
    store: JobStore, job_id: str, *, lease_lost: threading.Event | None, stopping: threading.Event | None
) -> None:
    """Raise why the job must stop now, if it must: the lease is lost, the user cancelled, or the driver stops.

    A lost lease comes first (the job is not ours to end), a cancel before a stop (the job should end, not wait
    on the queue for another driver to cancel it).
    """
    if lease_lost is not None and lease_lost.is_set():
        raise LeaseLost
    if store.cancel_requested(job_id):
        raise Cancelled
    if stopping is not None and stopping.is_set():
        raise Stopping
