"""What the driver tells Prometheus: evaluation latencies and the evaluators it holds, kept by the job store's
`TelemetryStore` for the API's `/metrics` to read.

A metrics report never fails a job: a Redis error is logged and the report dropped.

    meter = Telemetry.from_url(redis_url)
    meter.evaluators(job_id, alive=len(pool.actors))       # when the pool starts, after each generation
    meter.evaluation(reply.get("seconds"), failed=bool(reply.get("error")))   # per reply
    meter.evaluators(job_id, alive=0)                      # when the pool shuts down
"""

from __future__ import annotations

import logging

import redis

from darwinfront.core.telemetry import TelemetryStore

log = logging.getLogger(__name__)


class Telemetry:
    """The driver's meter: reports through a `TelemetryStore`, dropping what Redis refuses.

    Args:
        store: Where the reports go.
    """

    def __init__(self, store: TelemetryStore):
        self._store = store

    @classmethod
    def from_url(cls, url: str) -> Telemetry:
        """A meter on the Redis at `url`, on a client that does not retry: in an outage a report is dropped at
        once instead of holding up the evaluations."""
        return cls(TelemetryStore(redis.Redis.from_url(url, decode_responses=True)))

    def evaluation(self, seconds: float | None, *, failed: bool = False) -> None:
        """Report one evaluation and its wall time (None when unknown: a lost evaluator)."""
        try:
            self._store.count_evaluation(seconds, failed=failed)
        except redis.RedisError as exc:
            log.warning("telemetry write dropped: %s", exc)

    def evaluators(self, job_id: str, alive: int, *, lost: int = 0) -> None:
        """Report the evaluators held for `job_id` (and how many were replaced); `alive=0` when they are gone."""
        try:
            self._store.report_evaluators(job_id, alive, lost=lost)
        except redis.RedisError as exc:
            log.warning("telemetry write dropped: %s", exc)
