"""The keyless `/metrics` shows no job ids or per-job figures unless `DARWINFRONT_METRICS_PER_JOB` is on."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from darwinfront.core import methods
from darwinfront.core.settings import Settings
from darwinfront.core.telemetry import TelemetryStore
from service.app import create_app

pytest_plugins = ["service_fixtures"]

SPEC = {"model": {"source": "builtin:micro-llama"}, "prune": {"targets": [0.5]}}
FRONT = [{"candidate_id": "half", "objectives": {"kl": 0.7, "params": 500}, "target": 0.5, "generation": 0}]
PER_JOB = {"darwinfront_job_evaluations", "darwinfront_job_planned_evaluations", "darwinfront_job_generation",
           "darwinfront_front_size", "darwinfront_front_hypervolume", "darwinfront_job_evaluators_replaced"}


def _running_job(api_client, store, redis_client) -> str:
    job_id = api_client.post("/v1/jobs", json=SPEC).json()["id"]
    assert store.claim("d1", timeout=0) == job_id
    store.append_event(job_id, "prepared", {"dense": {"params": 1000}})
    store.set_front(job_id, FRONT, objectives=methods.get("structured_prune").stored_objectives())
    store.set_progress(job_id, {"generation": 3, "evaluations": 7, "planned": 20})
    TelemetryStore(redis_client).report_evaluators(job_id, 2, lost=1)
    return job_id


def _scrape(settings: Settings, redis_client) -> tuple[str, dict[str, list]]:
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics")  # no key, as a scraper
    assert response.status_code == 200
    return response.text, {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def test_per_job_series_are_off_by_default(api_client, store, redis_client, service_settings):
    assert service_settings.metrics_per_job is False
    job_id = _running_job(api_client, store, redis_client)
    text, families = _scrape(service_settings, redis_client)
    assert job_id not in text and "job_id" not in text
    assert not PER_JOB & set(families)
    assert {s.labels["status"]: s.value for s in families["darwinfront_jobs"]}["running"] == 1  # aggregates stay
    assert families["darwinfront_ray_evaluators_alive"][0].value == 2


def test_the_operator_can_turn_them_on(api_client, store, redis_client, service_settings, monkeypatch):
    monkeypatch.setenv("DARWINFRONT_METRICS_PER_JOB", "true")
    settings = Settings(**service_settings.model_dump(exclude={"metrics_per_job"}))  # the flag from the environment
    assert settings.metrics_per_job is True
    job_id = _running_job(api_client, store, redis_client)
    text, families = _scrape(settings, redis_client)
    assert set(families) >= PER_JOB
    by_job = {s.name: s.value for s in families["darwinfront_job_evaluations"] if s.labels == {"job_id": job_id}}
    assert by_job == {"darwinfront_job_evaluations_total": 7}
    assert [s.value for s in families["darwinfront_job_generation"]] == [3]
    assert f'job_id="{job_id}"' in text


@pytest.mark.parametrize("value", ["false", "0"])
def test_the_setting_reads_false(monkeypatch, value):
    monkeypatch.setenv("DARWINFRONT_METRICS_PER_JOB", value)
    assert Settings().metrics_per_job is False
