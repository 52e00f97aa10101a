"""Prometheus metrics, read from the job store at scrape time: one collector, no state in the API process.

Several API replicas then report the same numbers, and nothing is lost when one restarts. What the driver
measures (evaluation latency, evaluators alive) it writes through `workers.telemetry` into the store's
`TelemetryStore`; the rest is the job store's own data (statuses, queue, progress, fronts).

`/metrics` carries no API key, so by default it shows only aggregates over all tenants; the per-job series
(labelled by job id: evaluations, generation, front size and hypervolume, evaluators replaced) tell what
tenants run and appear only when the operator turns them on (`DARWINFRONT_METRICS_PER_JOB=true`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from darwinfront.core.errors import JobNotFound
from darwinfront.core.store import JobStore
from darwinfront.core.telemetry import EvaluatorReport, TelemetryStore
from service import history


class StoreCollector:
    """Collects darwinfront's metrics from the job store on every scrape.

    Args:
        store: The job store.
        telemetry: What the drivers measure, in the same Redis.
        per_job: Also report the series of each running job, labelled by its id.
    """

    def __init__(self, store: JobStore, telemetry: TelemetryStore, *, per_job: bool = False):
        self._store = store
        self._telemetry = telemetry
        self.per_job = per_job

    def collect(self) -> Iterator[Metric]:
        """The metric families (the `prometheus_client` collector protocol)."""
        yield self._jobs_by_status()
        queue = GaugeMetricFamily("darwinfront_queue_depth", "Jobs waiting on the queue for a driver.")
        queue.add_metric([], self._store.queue_depth())
        yield queue
        yield from self._evaluations()
        running = self._store.claimed_ids()
        reports = {job: report for job, report in self._telemetry.evaluator_reports().items() if job in running}
        alive = GaugeMetricFamily("darwinfront_ray_evaluators_alive", "Ray evaluator actors held by running jobs.")
        alive.add_metric([], sum(report.evaluators for report in reports.values()))
        yield alive
        if self.per_job:
            yield from self._running_jobs(running)
            yield self._evaluators_replaced(reports)

    def _jobs_by_status(self) -> Metric:
        family = GaugeMetricFamily("darwinfront_jobs", "Jobs by status, over all tenants.", labels=["status"])
        for status, count in self._store.count_by_status().items():
            family.add_metric([status.value], count)
        return family

    def _evaluations(self) -> Iterator[Metric]:
        counts = self._telemetry.evaluation_counts()
        total = CounterMetricFamily("darwinfront_evaluations", "Candidate evaluations the drivers finished.")
        total.add_metric([], counts.count)
        failed = CounterMetricFamily("darwinfront_evaluations_failed", "Candidate evaluations that failed.")
        failed.add_metric([], counts.failed)
        buckets, below = [], 0
        for bound, observed in counts.buckets:  # Prometheus buckets are cumulative
            below += observed
            buckets.append((_bound(bound), below))
        latency = HistogramMetricFamily("darwinfront_evaluation_seconds", "Wall time of one candidate evaluation.")
        latency.add_metric([], buckets, sum_value=counts.seconds_sum)
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
            hypervolume = history.front_hypervolume(front, history.dense_sizes(self._store, job_id))
            if front["points"] and hypervolume is not None:
                volume.add_metric([job_id], hypervolume)
        yield from (done, planned, generation, size, volume)

    @staticmethod
    def _evaluators_replaced(reports: dict[str, EvaluatorReport]) -> Metric:
        lost = CounterMetricFamily(
            "darwinfront_job_evaluators_replaced", "Evaluators of a running job that died and were replaced.",
            labels=["job_id"],
        )
        for job_id, report in reports.items():
            lost.add_metric([job_id], report.lost)
        return lost


def _bound(value: float) -> str:
    return "+Inf" if math.isinf(value) else repr(value)


def render(store: JobStore, telemetry: TelemetryStore, *, per_job: bool = False) -> bytes:
    """The Prometheus text exposition of everything `StoreCollector` reads (per-job series only with `per_job`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, telemetry, per_job=per_job))
    return generate_latest(registry)
