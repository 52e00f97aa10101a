"""The evaluation telemetry in Redis: what the drivers measure for `/metrics`. Part of the job store.

Drivers count every candidate evaluation and its latency, and report the Ray evaluators they hold per job; the
API's `/metrics` (`service.monitoring`) reads the totals at scrape time. Any number of drivers write at once:
the counters are hash increments (atomic), a few per evaluation in one transaction. The keys are the store's
(`darwinfront.core.keys`); the latency histogram is kept as one counter per bucket, so a scrape reads one hash.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import redis

from darwinfront.core import keys

# Histogram bounds of one evaluation, in seconds (a micro model scores in tens of ms, a 7B one in tens of s).
# Every one is reported, observed or not.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
_BUCKET = "le:"
_OVERFLOW = f"{_BUCKET}+Inf"


def _bucket_field(seconds: float) -> str:
    """The hash field counting evaluations of this duration: `le:<smallest bound >= seconds>` or `le:+Inf`."""
    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            return f"{_BUCKET}{bound}"
    return _OVERFLOW


@dataclass(frozen=True)
class EvaluationCounts:
    """Every evaluation the drivers counted, over all jobs.

    Attributes:
        count: Evaluations finished, failed ones included.
        failed: Evaluations that failed.
        seconds_sum: Total wall time of the evaluations with a known latency.
        buckets: `(upper bound, evaluations in it)` per latency bucket, ascending, not cumulative; the last
            bound is `math.inf`. It holds every bound of `LATENCY_BUCKETS`, and any other one found in Redis
            (written by drivers with other bounds), so no counted evaluation is left out.
    """

    count: int
    failed: int
    seconds_sum: float
    buckets: tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class EvaluatorReport:
    """The Ray evaluators a driver holds for one job, as it last reported them.

    Attributes:
        evaluators: Actors alive.
        lost: Actors that died and were replaced since the job started.
        at: When it reported (epoch seconds).
    """

    evaluators: int
    lost: int
    at: float


class TelemetryStore:
    """Evaluation counters and evaluator reports in Redis.

    Args:
        client: A redis-py client created with `decode_responses=True`.
    """

    def __init__(self, client: redis.Redis):
        self._r = client

    def count_evaluation(self, seconds: float | None, *, failed: bool = False) -> None:
        """Count one evaluation; its latency goes into the histogram when known (a lost evaluator has none)."""
        key = keys.evaluation_telemetry()
        pipe = self._r.pipeline(transaction=True)
        pipe.hincrby(key, "count", 1)
        if failed:
            pipe.hincrby(key, "failed", 1)
        if seconds is not None and seconds >= 0:
            pipe.hincrbyfloat(key, "sum", float(seconds))
            pipe.hincrby(key, "observed", 1)
            pipe.hincrby(key, _bucket_field(float(seconds)), 1)
        pipe.execute()

    def report_evaluators(self, job_id: str, alive: int, *, lost: int = 0) -> None:
        """Record the evaluators held for `job_id` (and how many were replaced); `alive=0` removes the entry."""
        key = keys.evaluator_telemetry()
        if alive > 0:
            self._r.hset(key, job_id, json.dumps({"evaluators": int(alive), "lost": int(lost), "at": time.time()}))
        else:
            self._r.hdel(key, job_id)

    def evaluation_counts(self) -> EvaluationCounts:
        """The evaluation totals and latency histogram, summed over every driver."""
        stats = self._r.hgetall(keys.evaluation_telemetry())
        found = {float(f.removeprefix(_BUCKET)) for f in stats if f.startswith(_BUCKET) and f != _OVERFLOW}
        buckets = [(bound, int(stats.get(f"{_BUCKET}{bound}", 0))) for bound in sorted(found | set(LATENCY_BUCKETS))]
        buckets.append((math.inf, int(stats.get(_OVERFLOW, 0))))
        return EvaluationCounts(
            count=int(stats.get("count", 0)), failed=int(stats.get("failed", 0)),
            seconds_sum=float(stats.get("sum", 0.0)), buckets=tuple(buckets),
        )

    def evaluator_reports(self) -> dict[str, EvaluatorReport]:
        """job id -> its driver's last evaluator report, for every job with evaluators up (or left behind by a
        driver that died: callers keep the jobs they know to be running)."""
        reports = {}
        for job_id, raw in self._r.hgetall(keys.evaluator_telemetry()).items():
            fields = json.loads(raw)
            reports[job_id] = EvaluatorReport(int(fields.get("evaluators", 0)), int(fields.get("lost", 0)),
                                              float(fields.get("at", 0.0)))
        return reports
