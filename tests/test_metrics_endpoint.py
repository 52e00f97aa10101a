"""`/metrics`: the Prometheus text the API renders from Redis, parsed with Prometheus' own parser."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from darwinfront.core import methods
from darwinfront.core.telemetry import TelemetryStore
from service.history import front_hypervolume, hypervolume_by_generation, scaled

pytest_plugins = ["service_fixtures"]

SPEC = {"model": {"source": "builtin:micro-llama"}, "prune": {"targets": [0.5]}}
DENSE = {"parameters": 1000}  # the dense model's size by unit, as history.dense_sizes reads it
# (1 - e^-KL, params / dense) = (0.5, 0.5) and (0.75, 0.25): hypervolume 0.25 * 0.25 + 0.5 * 0.5 = 0.3125.
FRONT = [
    {"candidate_id": "small", "objectives": {"kl": math.log(4), "params": 250}, "target": 0.75, "generation": 1},
    {"candidate_id": "half", "objectives": {"kl": math.log(2), "params": 500}, "target": 0.5, "generation": 0},
]


@pytest.fixture
def service_settings(service_settings):
    """Per-job series turned on: these tests read them (test_metrics_privacy.py checks they are off by default)."""
    return service_settings.model_copy(update={"metrics_per_job": True})


def scrape(api_client) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} of every sample."""
    response = api_client.get("/metrics", headers={"Authorization": ""})  # scrapers carry no key
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_hypervolume_known_answers():
    prune = methods.get("structured_prune").objectives
    assert scaled({"kl": math.log(2), "params": 500}, prune, DENSE) == pytest.approx((0.5, 0.5))
    snapshot = {"objectives": methods.get("structured_prune").stored_objectives(), "points": FRONT}
    assert front_hypervolume(snapshot, DENSE) == pytest.approx(0.3125)
    assert front_hypervolume({**snapshot, "points": []}, DENSE) == 0.0
    assert front_hypervolume(snapshot, {}) is None  # parameters need the dense size
    # up to generation 0 only "half" counts; generation 1 adds "small"; a dominated point changes nothing
    trials = [(0, {"kl": math.log(2), "params": 500}), (1, {"kl": math.log(4), "params": 250}),
              (1, {"kl": 5.0, "params": 900})]
    assert hypervolume_by_generation(trials, prune, DENSE) == pytest.approx({0: 0.25, 1: 0.3125})
    with pytest.raises(ValueError, match="dense sizes"):
        scaled({"kl": 0.1, "params": 10}, prune, {"parameters": 0})


def test_a_kv_front_is_scaled_by_its_bits_and_an_unknown_unit_has_no_hypervolume():
    # (1 - e^-KL, bits / 16) = (0.5, 0.25): the box to (1, 1) is 0.5 * 0.75
    kv = {"objectives": methods.get("kv_precision").stored_objectives(),
          "points": [{"candidate_id": "kv-1", "objectives": {"kl": math.log(2), "bits": 4.0}}]}
    assert front_hypervolume(kv, {}) == pytest.approx(0.375)
    odd = {"objectives": [{"name": "kl", "direction": "minimize", "unit": "nats"},
                          {"name": "latency", "direction": "minimize", "unit": "ms"}], "points": []}
    assert front_hypervolume(odd, DENSE) is None


def test_a_joint_front_is_scaled_by_the_dense_memory():
    # (1 - e^-KL, bytes / dense bytes) = (0.5, 0.25) and (0.75, 0.125): 0.5 * 0.75 + 0.25 * 0.125 = 0.40625
    joint = {"objectives": methods.get("joint").stored_objectives(),
             "points": [{"candidate_id": "a", "objectives": {"kl": math.log(2), "memory": 2000}},
                        {"candidate_id": "b", "objectives": {"kl": math.log(4), "memory": 1000}}]}
    assert front_hypervolume(joint, {"bytes": 8000}) == pytest.approx(0.40625)
    assert front_hypervolume(joint, {"parameters": 8000}) is None  # the dense memory is not known


def test_a_joint_front_with_latency_is_scaled_by_the_dense_latency_in_three_dimensions():
    # (1 - e^-KL, bytes / dense bytes, ms / (ms + dense ms)) = (0.5, 0.25, 0.5): the box to (1, 1, 1) is
    # 0.5 * 0.75 * 0.5; a second point (0.75, 0.125, 0.25) adds 0.25 * 0.875 * 0.75 - the overlap
    # 0.25 * 0.75 * 0.5
    spec = {"method": "joint", "model": {"source": "builtin:tiny-llama"}, "deployment": {"latency": True}}
    objectives = methods.get("joint").stored_objectives(spec)
    assert [o["unit"] for o in objectives] == ["nats", "bytes", "ms"]
    joint = {"objectives": objectives,
             "points": [{"candidate_id": "a", "objectives": {"kl": math.log(2), "memory": 2000, "latency": 10.0}},
                        {"candidate_id": "b", "objectives": {"kl": math.log(4), "memory": 1000, "latency": 10 / 3}}]}
    expected = 0.5 * 0.75 * 0.5 + 0.25 * 0.875 * 0.75 - 0.25 * 0.75 * 0.5
    assert front_hypervolume(joint, {"bytes": 8000, "ms": 10.0}) == pytest.approx(expected)
    assert front_hypervolume(joint, {"bytes": 8000}) is None  # the dense latency is not known


def test_metrics_report_jobs_queue_evaluations_and_fronts(api_client, store, redis_client):
    queued = api_client.post("/v1/jobs", json=SPEC).json()["id"]
    running = api_client.post("/v1/jobs", json=SPEC).json()["id"]
    assert store.claim("d1", timeout=0) == queued  # the oldest is taken first: it runs, `running` waits
    running, queued = queued, running
    store.append_event(running, "prepared", {"dense": {"params": DENSE["parameters"]}})
    store.set_front(running, FRONT, objectives=methods.get("structured_prune").stored_objectives())
    store.set_progress(running, {"generation": 1, "evaluations": 7, "planned": 20})
    telemetry = TelemetryStore(redis_client)
    telemetry.count_evaluation(0.3)
    telemetry.count_evaluation(2.0, failed=True)
    telemetry.count_evaluation(None, failed=True)  # a lost evaluator: counted, no latency
    telemetry.report_evaluators(running, 2, lost=1)
    telemetry.report_evaluators("finished-long-ago", 5)  # not running: not counted

    m = scrape(api_client)
    assert m["darwinfront_jobs"][(("status", "queued"),)] == 1
    assert m["darwinfront_jobs"][(("status", "running"),)] == 1
    assert m["darwinfront_jobs"][(("status", "succeeded"),)] == 0
    assert m["darwinfront_queue_depth"][()] == 1
    assert m["darwinfront_evaluations_total"][()] == 3
    assert m["darwinfront_evaluations_failed_total"][()] == 2
    buckets = m["darwinfront_evaluation_seconds_bucket"]
    assert buckets[(("le", "0.25"),)] == 0 and buckets[(("le", "0.5"),)] == 1
    assert buckets[(("le", "2.5"),)] == 2 and buckets[(("le", "+Inf"),)] == 2
    assert m["darwinfront_evaluation_seconds_count"][()] == 2
    assert m["darwinfront_evaluation_seconds_sum"][()] == pytest.approx(2.3)
    job = (("job_id", running),)
    assert m["darwinfront_job_evaluations_total"][job] == 7
    assert m["darwinfront_job_planned_evaluations"][job] == 20
    assert m["darwinfront_front_size"][job] == 2
    assert m["darwinfront_front_hypervolume"][job] == pytest.approx(0.3125)
    assert m["darwinfront_ray_evaluators_alive"][()] == 2
    assert m["darwinfront_job_evaluators_replaced_total"][job] == 1


def test_counters_move_and_finished_jobs_leave_the_per_job_series(api_client, store, redis_client):
    job_id = api_client.post("/v1/jobs", json=SPEC).json()["id"]
    store.claim("d1", timeout=0)
    store.set_progress(job_id, {"generation": 0, "evaluations": 4, "planned": 8})
    before = scrape(api_client)
    TelemetryStore(redis_client).count_evaluation(0.04)
    store.set_progress(job_id, {"generation": 1, "evaluations": 8, "planned": 8})
    after = scrape(api_client)
    job = (("job_id", job_id),)
    assert before["darwinfront_job_evaluations_total"][job] == 4
    assert after["darwinfront_job_evaluations_total"][job] == 8
    assert after["darwinfront_evaluations_total"][()] == before["darwinfront_evaluations_total"][()] + 1
    assert job not in after.get("darwinfront_front_hypervolume", {})  # no dense size known: no hypervolume

    store.set_status(job_id, "succeeded")
    done = scrape(api_client)
    assert done["darwinfront_jobs"][(("status", "succeeded"),)] == 1
    assert done["darwinfront_jobs"][(("status", "running"),)] == 0
    assert job not in done.get("darwinfront_job_evaluations_total", {})

