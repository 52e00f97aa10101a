"""Progress of the steps before a search: each step reported to the job's progress and event log as it goes.

A job's prepare step runs as a Ray task and its evaluators as actors, away from the driver. A `StepReport`
travels to them by pickling (the Redis URL and job id, never a client) and opens its own store connection
where it runs. Without a URL it only logs, which is what tests and benchmarks that call `prepare` directly get.

What a report writes, as the job's progress and as a `prepare` event:
`{"phase": "prepare", "step": "database", "message": "database 12/30 layers, 40 s left", "done": 12,
"total": 30, "eta_seconds": 40.0, "elapsed_seconds": 31.5}`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """`40 s`, `3.5 min`, `1.2 h`: a duration as people read it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def eta(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left when `done` of `total` equal steps took `elapsed` seconds (None before the first step)."""
    if done <= 0 or total <= 0:
        return None
    return elapsed / done * max(0, total - done)


class StepReport:
    """Reports the steps of a job's preparation to its store (progress and events) and the log.

    Args:
        redis_url: the job store's Redis; None to only log.
        job_id: the job the steps belong to.
    """

    def __init__(self, redis_url: str | None = None, job_id: str = ""):
        self.redis_url, self.job_id = redis_url, job_id
        self._store = None

    def __getstate__(self) -> dict:
        return {"redis_url": self.redis_url, "job_id": self.job_id}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["redis_url"], state["job_id"])

    def __call__(
        self, step: str, message: str, *, done: int | None = None, total: int | None = None,
        started: float | None = None, event: bool = True,
    ) -> dict:
        """Report `step` with a readable `message`; with `done`/`total`/`started` (a `time.perf_counter()`),
        the elapsed time and an ETA are added to the message. Returns what was reported."""
        report: dict = {"phase": "prepare", "step": step, "message": message}
        if total is not None:
            report.update(done=done or 0, total=total)
        if started is not None:
            elapsed = time.perf_counter() - started
            report["elapsed_seconds"] = round(elapsed, 2)
            left = eta(done or 0, total or 0, elapsed) if total is not None else None
            if left is not None:
                report["eta_seconds"] = round(left, 1)
                if done < total:
                    report["message"] = f"{message}, {format_seconds(left)} left"
        log.info("job %s: %s", self.job_id or "-", report["message"])
        self._write(report, event)
        return report

    def counter(self, step: str, noun: str) -> Callable[[int, int], None]:
        """A callback `(done, total)` reporting `step` as `"<step> 12/30 <noun>, 40 s left"` from its first call."""
        started = time.perf_counter()

        def update(done: int, total: int) -> None:
            self(step, f"{step} {done}/{total} {noun}", done=done, total=total, started=started)

        return update

    def _write(self, report: dict, event: bool) -> None:
        if not self.redis_url:
            return
        try:
            if self._store is None:
                from darwinfront.core.store import JobStore, connect

                self._store = JobStore(connect(self.redis_url))
            self._store.set_progress(self.job_id, report)
            if event:
                self._store.append_event(self.job_id, "prepare", report)
        except redis.RedisError as exc:  # progress is advisory: a Redis hiccup must not fail the job
            log.warning("could not report progress of job %s: %s", self.job_id, exc)
