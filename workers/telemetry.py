"""What the driver tells Prometheus, through Redis: evaluation latencies and the evaluators it holds.

The driver writes; the API's `/metrics` reads (`service.monitoring`). Writes are a few hash increments per
evaluation, in one pipeline. A metrics write never fails a job: a Redis error is logged and dropped.

    meter = Telemetry.from_url(redis_url)
    meter.evaluators(job_id, alive=len(pool.actors))       # when the pool starts, after each generation
    meter.evaluation(reply.get("seconds"), failed=bool(reply.get("error")))   # per reply
    meter.evaluators(job_id, alive=0)                      # when the pool shuts down
"""

from __future__ import annotations

import json
import logging
import time

import redis

from darwinfront.core import keys
from service.monitoring import LATENCY_BUCKETS

log = logging.getLogger(__name__)


def bucket_field(seconds: float) -> str:
    """The hash field counting evaluations of this duration: `le:<smallest bound >= seconds>` or `le:+Inf`."""
    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            return f"le:{bound}"
    return "le:+Inf"


class Telemetry:
    """Counters in Redis that any number of drivers update at once (HINCRBY is atomic).

    Args:
        client: A redis-py client (`decode_responses=True`).
    """

    def __init__(self, client: redis.Redis):
        self._r = client

    @classmethod
    def from_url(cls, url: str) -> Telemetry:
        """A telemetry writer on the Redis at `url`."""
        return cls(redis.Redis.from_url(url, decode_responses=True))

    def evaluation(self, seconds: float | None, *, failed: bool = False) -> None:
        """Count one evaluation; its latency goes into the histogram when known (a lost evaluator has none)."""
        key = keys.evaluation_telemetry()
        pipe = self._r.pipeline(transaction=True)
        pipe.hincrby(key, "count", 1)
        if failed:
            pipe.hincrby(key, "failed", 1)
        if seconds is not None and seconds >= 0:
            pipe.hincrbyfloat(key, "sum", float(seconds))
            pipe.hincrby(key, "observed", 1)
            pipe.hincrby(key, bucket_field(float(seconds)), 1)
        self._write(pipe)

    def evaluators(self, job_id: str, alive: int, *, lost: int = 0) -> None:
        """Report the evaluators held for `job_id` (and how many were replaced); `alive=0` removes the entry."""
        key = keys.evaluator_telemetry()
        pipe = self._r.pipeline(transaction=True)
        if alive > 0:
            pipe.hset(key, job_id, json.dumps({"evaluators": int(alive), "lost": int(lost), "at": time.time()}))
        else:
            pipe.hdel(key, job_id)
        self._write(pipe)

    @staticmethod
    def _write(pipe: redis.client.Pipeline) -> None:
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("telemetry write dropped: %s", exc)
