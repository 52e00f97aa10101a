"""The steps every job shares, and why a job stops early; a job method's runner subclasses `Job` and only does its
work.

The driver builds a runner with the job's store and id, the Redis URL, the data directory and two events (the
lease lost, the driver stopping) and calls `run()`. At its safe points (between evaluations, generations or
training steps) the runner calls `check_interrupts()`, which raises one of the exceptions below; the driver turns
each into the job's ending.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

from darwinfront.core.methods import JobMethod, method_of, parse_spec
from darwinfront.core.spec import JobSpec
from darwinfront.core.store import JobStore


class Cancelled(Exception):
    """The user asked to cancel; the job ends `cancelled` with its partial front kept."""


class LeaseLost(Exception):
    """Another driver took the job over (our lease lapsed and the job was requeued); stop touching it."""


class Stopping(Exception):
    """The driver is shutting down (SIGTERM / SIGINT); the job goes back to the queue with what it recorded, and
    the next driver resumes it from its checkpoint and recorded candidates."""


@dataclass
class Job(ABC):
    """One job run by its method's runner.

    Args:
        store: The job store.
        job_id: The job.
        redis_url: The store's Redis (also Optuna's, and where Ray tasks report progress); None when unused.
        data_dir: Where model archives live.
        lease_lost: Set by the driver's lease keeper when the job is taken over.
        stopping: Set when the driver shuts down.
    """

    store: JobStore
    job_id: str
    _: KW_ONLY
    redis_url: str | None = None
    data_dir: Path | None = None
    lease_lost: threading.Event | None = None
    stopping: threading.Event | None = None

    @abstractmethod
    def run(self) -> None:
        """Do the job's work to its end; raise at a safe point when the job must stop (`check_interrupts`)."""

    @functools.cached_property
    def spec_dict(self) -> dict[str, Any]:
        """The spec as stored (what Ray tasks and evaluators are given)."""
        return self.store.get(self.job_id).spec

    @functools.cached_property
    def spec(self) -> JobSpec:
        """The spec, parsed as its method's class."""
        return parse_spec(self.spec_dict)

    @property
    def method(self) -> JobMethod:
        """The job's method, from the registry."""
        return method_of(self.spec_dict)

    def progress(self, report: dict[str, Any]) -> None:
        """Replace the job's progress (what the API, the CLI bar and the dashboard show)."""
        self.store.set_progress(self.job_id, report)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        """Append an event to the job's log."""
        self.store.append_event(self.job_id, kind, data)

    def publish_front(self, points: list[dict[str, Any]], *, generation: int | None) -> None:
        """Replace the front snapshot; it carries the job's objectives. `generation=None` for the final one."""
        self.store.set_front(self.job_id, points, objectives=self.method.stored_objectives(self.spec),
                             generation=generation)

    def generation_done(
        self, generation: int, *, front: list[dict[str, Any]], progress: dict[str, Any], event: dict[str, Any],
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        """Record a finished generation (front, progress, checkpoint when given, a `generation` event), then stop
        here if the job must stop: the end of a generation is every search's safe point."""
        self.publish_front(front, generation=generation)
        self.progress(progress)
        if checkpoint is not None:
            self.store.save_checkpoint(self.job_id, generation, checkpoint)
        self.event("generation", event)
        self.check_interrupts()

    def check_interrupts(self) -> None:
        """Raise why the job must stop now, if it must: the lease is lost, the user cancelled, or the driver stops.

        A lost lease comes first (the job is not ours to end), a cancel before a stop (the job should end, not wait
        on the queue for another driver to cancel it).
        """
        if self.lease_lost is not None and self.lease_lost.is_set():
            raise LeaseLost
        if self.store.cancel_requested(self.job_id):
            raise Cancelled
        self.check_stopping()

    def check_stopping(self) -> None:
        """Raise `Stopping` when the driver is stopping: the cheap check, between evaluations of a generation."""
        if self.stopping is not None and self.stopping.is_set():
            raise Stopping
