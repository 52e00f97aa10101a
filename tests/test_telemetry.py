"""The evaluation telemetry: the store's counters (`TelemetryStore`) and the driver's meter, which never fails a job."""

from __future__ import annotations

import logging
import math

import pytest
import redis

from darwinfront.core import keys
from darwinfront.core.telemetry import LATENCY_BUCKETS, EvaluationCounts, EvaluatorReport, TelemetryStore
from workers.telemetry import Telemetry

pytest_plugins = ["service_fixtures"]


def _observed(counts: EvaluationCounts) -> dict[float, int]:
    return {bound: n for bound, n in counts.buckets if n}


def test_nothing_counted_reads_as_zeros_on_every_bound(redis_client):
    counts = TelemetryStore(redis_client).evaluation_counts()
    assert (counts.count, counts.failed, counts.seconds_sum) == (0, 0, 0.0)
    assert [bound for bound, _ in counts.buckets] == [*LATENCY_BUCKETS, math.inf]
    assert all(n == 0 for _, n in counts.buckets)


def test_each_latency_lands_in_the_smallest_bucket_that_holds_it(redis_client):
    telemetry = TelemetryStore(redis_client)
    for seconds in (0.01, 0.3, 0.5, LATENCY_BUCKETS[-1] + 1):
        telemetry.count_evaluation(seconds)
    telemetry.count_evaluation(None, failed=True)  # a lost evaluator: counted, no latency
    telemetry.count_evaluation(-1.0)  # no meaningful latency either
    counts = telemetry.evaluation_counts()
    assert _observed(counts) == {0.01: 1, 0.5: 2, math.inf: 1}
    assert (counts.count, counts.failed) == (6, 1)
    assert counts.seconds_sum == pytest.approx(0.01 + 0.3 + 0.5 + LATENCY_BUCKETS[-1] + 1)


def test_a_bound_written_by_another_driver_version_is_still_read(redis_client):
    redis_client.hincrby(keys.evaluation_telemetry(), "le:0.3", 2)  # a bound LATENCY_BUCKETS does not have
    counts = TelemetryStore(redis_client).evaluation_counts()
    bounds = [bound for bound, _ in counts.buckets]
    assert bounds == sorted(bounds) and _observed(counts) == {0.3: 2}


def test_evaluator_reports_are_replaced_and_removed_at_zero(redis_client):
    telemetry = TelemetryStore(redis_client)
    telemetry.report_evaluators("j1", 3)
    telemetry.report_evaluators("j1", 2, lost=1)
    telemetry.report_evaluators("j2", 1)
    reports = telemetry.evaluator_reports()
    assert set(reports) == {"j1", "j2"}
    assert isinstance(reports["j1"], EvaluatorReport) and (reports["j1"].evaluators, reports["j1"].lost) == (2, 1)
    telemetry.report_evaluators("j1", 0)
    assert set(telemetry.evaluator_reports()) == {"j2"}


def test_the_meter_writes_through_the_store(redis_client):
    meter = Telemetry(TelemetryStore(redis_client))
    meter.evaluation(0.02, failed=True)
    meter.evaluators("j1", 4, lost=2)
    telemetry = TelemetryStore(redis_client)
    assert telemetry.evaluation_counts().failed == 1 and _observed(telemetry.evaluation_counts()) == {0.025: 1}
    assert telemetry.evaluator_reports()["j1"].lost == 2


def test_the_meter_drops_what_redis_refuses(caplog):
    unreachable = redis.Redis(host="127.0.0.1", port=1, decode_responses=True, socket_connect_timeout=1)
    meter = Telemetry(TelemetryStore(unreachable))
    with caplog.at_level(logging.WARNING, logger="workers.telemetry"):
        meter.evaluation(0.1)  # no exception: a metrics write never fails a job
        meter.evaluators("j1", 2)
    assert [r.getMessage().startswith("telemetry write dropped") for r in caplog.records] == [True, True]
