"""Adding a job method is one module plus its registry line: `plugin_method.COUNT`, registered here, flows through
spec parsing, the API, the driver's dispatch and the front's objectives without any other file knowing it."""

from __future__ import annotations

from typing import Literal

import plugin_method
import pytest
from pydantic import ValidationError

from darwinfront.core import methods
from darwinfront.core.methods import JobMethod, Objective, parse_spec
from darwinfront.core.spec import JobSpec
from darwinfront.core.status import JobStatus
from darwinfront.watch import format_front
from service.schemas import Front
from workers.driver import Driver

pytest_plugins = ["service_fixtures"]

MODEL = {"source": "builtin:tiny-llama"}
COUNT = {"method": "count", "model": MODEL, "count": {"points": 4}}


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> JobMethod:
    """`count` registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    return methods.register(plugin_method.COUNT)


def test_a_registered_method_parses_and_plans_its_evaluations(registered):
    spec = parse_spec(COUNT)
    assert isinstance(spec, plugin_method.CountJobSpec) and spec.planned_evaluations() == 4
    assert methods.method_of(spec.model_dump()) is registered
    with pytest.raises(ValidationError) as caught:
        parse_spec({**COUNT, "prune": {"targets": [0.5]}})
    assert [(e["loc"], e["msg"]) for e in caught.value.errors()] == [
        (("prune",), "does not apply to method count (it is a section of structured_prune, joint)")]
    with pytest.raises(ValidationError) as caught:
        parse_spec({**COUNT, "count": {"points": 0}})
    assert caught.value.errors()[0]["loc"] == ("count", "points")
    with pytest.raises(ValidationError, match="'posttrain', 'evaluate', 'joint' or 'count'"):
        parse_spec({**COUNT, "method": "counting"})


def test_an_unregistered_method_is_refused_by_name():
    with pytest.raises(ValidationError) as caught:
        parse_spec(COUNT)
    assert caught.value.errors()[0]["loc"] == ("method",) and "count" not in caught.value.errors()[0]["msg"]


def test_the_registry_refuses_inconsistent_methods(registered):
    class Other(JobSpec):
        method: Literal["other"]

    objectives = registered.objectives
    with pytest.raises(ValueError, match="already registered"):
        methods.register(plugin_method.COUNT)
    with pytest.raises(ValueError, match=r"Literal\['misnamed'\]"):
        methods.register(JobMethod(name="misnamed", spec=Other, objectives=objectives, runner="m:C"))
    with pytest.raises(ValueError, match="'module:Class'"):
        methods.register(JobMethod(name="other", spec=Other, objectives=objectives, runner="workers.job"))
    repeated = (Objective(name="kl", direction="minimize", unit="nats"),) * 2
    with pytest.raises(ValueError, match="distinct objectives"):
        methods.register(JobMethod(name="other", spec=Other, objectives=repeated, runner="m:C"))
    assert "other" not in methods.names()


def test_the_api_creates_a_job_of_a_registered_method(registered, api_client, store):
    response = api_client.post("/v1/jobs", json=COUNT)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["spec"]["count"] == {"points": 4} and store.get(job["id"]).spec["method"] == "count"
    assert api_client.get("/v1/jobs", params={"limit": 1}).json()["total"] == 1


def test_the_driver_runs_it_and_its_front_carries_its_objectives(registered, store, redis_server, tmp_path):
    job_id = store.create("alpha", parse_spec(COUNT).model_dump(mode="json"), planned=4).id
    driver = Driver(redis_server.url, tmp_path)
    assert driver.store.claim(driver.driver_id, timeout=0, lease_seconds=30) == job_id
    assert driver.run_job(job_id) is JobStatus.succeeded
    snapshot = store.get_front(job_id)
    assert snapshot["objectives"] == [{"name": "error", "direction": "minimize", "unit": "ratio"},
                                      {"name": "size", "direction": "minimize", "unit": "units"}]
    assert snapshot["points"] == plugin_method.count_front(4) and snapshot["generation"] == 0
    assert store.get(job_id).progress == {"generation": 0, "evaluations": 4, "planned": 4}
    table = format_front(Front(job_id=job_id, **snapshot)).splitlines()
    assert table[0].split() == ["candidate", "error", "size"] and table[1].split() == ["c0", "1", "0"]


def test_a_stored_job_of_an_unknown_method_fails_saying_so(store, redis_server, tmp_path):
    job_id = store.create("alpha", {"method": "count", "model": MODEL}).id
    driver = Driver(redis_server.url, tmp_path)
    assert driver.store.claim(driver.driver_id, timeout=0, lease_seconds=30) == job_id
    assert driver.run_job(job_id) is JobStatus.failed
    assert store.get(job_id).error.startswith("InvalidSpec: method: no job method 'count' is registered here")
