"""Prometheus metrics, read from Redis at scrape time: one collector, no state in the API process.

Several API replicas then report the same numbers, and nothing is lost when one restarts. What the driver
measures (evaluation latency, evaluators alive) it writes through `workers.telemetry`; the rest is the job
store's own data (statuses, queue, progress, fronts).

`/metrics` carries no API key, so by default it shows only aggregates over all tenants; the per-job series
(labelled by job id: evaluations, generation, front size and hypervolume, evaluators replaced) tell what
tenants run and appear only when the operator turns them on (`DARWINFRONT_METRICS_PER_JOB=true`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from darwinfront.core import keys
from darwinfront.core.errors import JobNotFound
from darwinfront.core.status import JobStatus
from darwinfront.core.store import JobStore
from service import history

# Histogram bounds of one evaluation, in seconds (a micro model scores in tens of ms, a 7B one in tens of s).
# `workers.telemetry` counts into these; every one is reported, observed or not.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)


class StoreCollector:
    """Collects darwinfront's metrics from its Redis on every scrape.

    Args:
        client: A redis-py client (`decode_responses=True`) on the job store's Redis.
        per_job: Also report the series of each running job, labelled by its id.
    """

    def __init__(self, client: redis.Redis, *, per_job: bool = False):
        self._r = client
        self._store = JobStore(client)
        self.per_job = per_job

    def collect(self) -> Iterator[Metric]:
        """The metric families (the `prometheus_client` collector protocol)."""
        yield self._jobs_by_status()
        queue = GaugeMetricFamily("darwinfront_queue_depth", "Jobs waiting on the queue for a driver.")
        queue.add_metric([], self._r.llen(keys.queue()))
        yield queue
        yield from self._evaluations()
        running = list(dict.fromkeys(self._r.lrange(keys.claimed(), 0, -1)))  # unique, in order
        reports = {job: json.loads(raw) for job, raw in self._r.hgetall(keys.evaluator_telemetry()).items()
                   if job in running}
        alive = GaugeMetricFamily("darwinfront_ray_evaluators_alive", "Ray evaluator actors held by running jobs.")
        alive.add_metric([], sum(int(r.get("evaluators", 0)) for r in reports.values()))
        yield alive
        if self.per_job:
            yield from self._running_jobs(running)
            yield self._evaluators_replaced(reports)

    def _jobs_by_status(self) -> Metric:
        counts = {status.value: 0 for status in JobStatus}
        index_keys = list(self._r.scan_iter(match=keys.jobs_by_status_pattern(), count=500))
        pipe = self._r.pipeline(transaction=False)
        for key in index_keys:
            pipe.zcard(key)
        for key, size in zip(index_keys, pipe.execute(), strict=True):
            status = key.rsplit(":", 1)[1]
            if status in counts:
                counts[status] += size
        family = GaugeMetricFamily("darwinfront_jobs", "Jobs by status, over all tenants.", labels=["status"])
        for status, count in counts.items():
            family.add_metric([status], count)
        return family

    def _evaluations(self) -> Iterator[Metric]:
        stats = self._r.hgetall(keys.evaluation_telemetry())
        total = CounterMetricFamily("darwinfront_evaluations", "Candidate evaluations the drivers finished.")
        total.add_metric([], int(stats.get("count", 0)))
        failed = CounterMetricFamily("darwinfront_evaluations_failed", "Candidate evaluations that failed.")
        failed.add_metric([], int(stats.get("failed", 0)))
        seen = {float(f.removeprefix("le:")) for f in stats if f.startswith("le:") and f != "le:+Inf"}
        buckets, running = [], 0
        for bound in sorted(seen | set(LATENCY_BUCKETS)):
            running += int(stats.get(f"le:{bound}", 0))
            buckets.append((_bound(bound), running))
        buckets.append(("+Inf", running + int(stats.get("le:+Inf", 0))))
        latency = HistogramMetricFamily("darwinfront_evaluation_seconds", "Wall time of one candidate evaluation.")
        latency.add_metric([], buckets, sum_value=float(stats.get("sum", 0.0)))
        yield from (total, failed, latency)

    def _running_jobs(self, job_ids: list[str]) -> Iterator[Metric]:
        labels = ["job_id"]
        done = CounterMetricFamily("darwinfront_job_evaluations", "Evaluations of a running job.", labels=labels)
        planned = GaugeMetricFamily("darwinfront_job_planned_evaluations", "Evaluations a job plans.", labels=labels)
        generation = GaugeMetricFamily("darwinfront_job_generation", "Last finished generation.", labels=labels)
        size = GaugeMetricFamily("darwinfront_front_size", "Points on a running job's front.", labels=labels)
        volume = GaugeMetricFamily(
            "darwinfront_front_hypervolume", f"Hypervolume of a running job's front ({history.SCALING}).", labels=labels
        )
        for job_id in job_ids:
            try:
                progress = self._store.get(job_id).progress
            except JobNotFound:  # dropped while we looked
                continue
            front = self._store.get_front(job_id)
            done.add_metric([job_id], int(progress.get("evaluations", 0)))
            planned.add_metric([job_id], int(progress.get("planned", 0)))
            if progress.get("generation") is not None:
                generation.add_metric([job_id], int(progress["generation"]))
            size.add_metric([job_id], len(front["points"]))
            hypervolume = history.front_hypervolume(front, history.dense_params(self._store, job_id))
            if front["points"] and hypervolume is not None:
                volume.add_metric([job_id], hypervolume)
        yield from (done, planned, generation, size, volume)

    @staticmethod
    def _evaluators_replaced(reports: dict[str, dict]) -> Metric:
        lost = CounterMetricFamily(
            "darwinfront_job_evaluators_replaced", "Evaluators of a running job that died and were replaced.",
            labels=["job_id"],
        )
        for job_id, report in reports.items():
            lost.add_metric([job_id], int(report.get("lost", 0)))
        return lost


def _bound(value: float) -> str:
    return "+Inf" if math.isinf(value) else repr(value)


def render(client: redis.Redis, *, per_job: bool = False) -> bytes:
    """The Prometheus text exposition of everything `StoreCollector` reads (per-job series only with `per_job`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(client, per_job=per_job))
    return generate_latest(registry)
