"""Post-training over the API: the follow-up job route, `POST /v1/jobs` with method posttrain, the client and
the CLI. A real (embedded) Redis; no driver: the tests write what a driver of the parent job writes."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from darwinfront.core.methods import parse_spec
from darwinfront.core.status import JobStatus
from darwinfront.core.store import JobStore

pytest_plugins = ["service_fixtures"]

CANDIDATE = "t0-g1-c2"
PRUNE = {"model": {"source": "builtin:micro-llama", "device": "cpu"}, "data": {"seq_len": 64},
         "search": {"generations": 2, "offspring": 4}, "seed": 7, "resources": {"gpus_per_evaluator": 0.5}}
KV = {"method": "kv_precision", "model": {"source": "builtin:micro-llama"}, "kv": {"trials": 4}}


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    return body["error"]


def _parent(store: JobStore, spec: dict = PRUNE, *, status: JobStatus = JobStatus.succeeded,
            candidate: str | None = CANDIDATE, tenant: str = "alpha") -> str:
    """A job as its driver leaves it: claimed, its candidate's configuration stored, then `status`."""
    job_id = store.create(tenant, parse_spec(spec).model_dump(mode="json")).id
    while (claimed := store.claim("test-driver", timeout=0)) not in (job_id, None):
        pass
    assert claimed == job_id
    if candidate is not None:
        store.put_result(job_id, candidate, {"candidate_id": candidate, "parameters": 1000})
    if status is not JobStatus.running:
        store.set_status(job_id, status)
    return job_id


def _route(job_id: str, candidate: str = CANDIDATE) -> str:
    return f"/v1/jobs/{job_id}/candidates/{candidate}/posttrain"


def test_the_route_creates_a_follow_up_job_and_leaves_the_parent_untouched(api_client: TestClient, store: JobStore):
    parent = _parent(store)
    before = (store.get(parent), store.get_result(parent, CANDIDATE), store.events(parent), store.result_ids(parent))
    response = api_client.post(_route(parent), json={"tokens": 8192, "loss": "ce", "name": "longer"})
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}" and job["status"] == "queued"
    spec = job["spec"]
    assert spec["method"] == "posttrain" and job["name"] == "longer"
    assert spec["posttrain"] == {"job": parent, "candidate": CANDIDATE, "tokens": 8192, "loss": "ce", "lr": 1e-4,
                                 "batch_size": 8, "seed": 0, "serene": None, "block_distill": None}
    parent_spec = store.get(parent).spec
    assert {k: spec[k] for k in ("model", "data", "seed", "resources")} == {
        k: parent_spec[k] for k in ("model", "data", "seed", "resources")}  # inherited
    assert "prune" not in spec and "search" not in spec
    assert store.claim("test-driver", timeout=0) == job["id"]  # queued like any job
    assert (store.get(parent), store.get_result(parent, CANDIDATE), store.events(parent),
            store.result_ids(parent)) == before


def test_an_empty_body_takes_the_defaults_and_the_follow_up_is_an_ordinary_job(api_client, store):
    parent = _parent(store)
    job = api_client.post(_route(parent)).json()
    assert job["spec"]["posttrain"]["tokens"] == 131072 and job["spec"]["posttrain"]["loss"] == "kd"
    assert api_client.get(f"/v1/jobs/{job['id']}").json() == job
    assert [e["kind"] for e in api_client.get(f"/v1/jobs/{job['id']}/events").json()["events"]] == ["queued"]
    assert api_client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert job["id"] in [j["id"] for j in api_client.get("/v1/jobs").json()["items"]]


def test_unknown_parents_and_candidates_are_404_with_the_field(api_client, store, other_headers):
    parent = _parent(store)
    cases = [
        (api_client.post(_route("ffffffffffffffff")), "job_not_found", "job_id"),
        (api_client.post(_route(parent, "t9-g9-c9")), "candidate_not_found", "candidate_id"),
        (api_client.post(_route(parent), headers=other_headers), "job_not_found", "job_id"),  # another tenant's
        (api_client.post("/v1/jobs", json={"method": "posttrain", "posttrain": {"job": "ffff", "candidate": "c"}}),
         "job_not_found", "posttrain.job"),
        (api_client.post("/v1/jobs", json={"method": "posttrain", "posttrain": {"job": parent, "candidate": "x"}}),
         "candidate_not_found", "posttrain.candidate"),
    ]
    for response, code, field in cases:
        assert response.status_code == 404, response.text
        error = _error(response)
        assert (error["code"], error["field"]) == (code, field) and error["message"].startswith(field)
    assert [j.id for j in store.list("alpha")[0]] == [parent]


def test_a_parent_that_is_not_a_finished_prune_job_is_refused(api_client, store):
    kv = _parent(store, KV)
    response = api_client.post(_route(kv))
    assert response.status_code == 422 and _error(response)["code"] == "not_a_prune_job"
    assert _error(response)["field"] == "job_id" and "kv_precision" in _error(response)["message"]

    running = _parent(store, status=JobStatus.running, candidate=None)
    response = api_client.post(_route(running))
    assert response.status_code == 409 and _error(response)["code"] == "job_not_finished"
    assert "running" in _error(response)["message"]

    follow_up = api_client.post(_route(_parent(store))).json()["id"]
    store.put_result(follow_up, CANDIDATE, {"candidate_id": CANDIDATE})
    response = api_client.post(_route(follow_up))  # post-train from the original parent instead
    assert response.status_code == 422 and "posttrain job" in _error(response)["message"]

    cancelled = _parent(store, status=JobStatus.cancelled, candidate=None)
    assert api_client.post(_route(cancelled)).status_code == 404


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"tokens": 0}, "tokens", "greater than or equal to 1"),
        ({"lr": -1}, "lr", "greater than 0"),
        ({"loss": "mse"}, "loss", "'kd' or 'ce'"),
        ({"job": "other"}, "job", "Extra inputs are not permitted"),
        ({"model": {"source": "builtin:tiny-llama"}}, "model", "Extra inputs are not permitted"),
        ({"serene": {"threshold": 0}}, "serene.threshold", "greater than 0"),
        ({"loss": "ce", "block_distill": {"freeze_early": 1}}, "block_distill", "needs loss kd"),
    ],
)
def test_bad_options_are_422_naming_the_field(api_client, store, body, field, words):
    parent = _parent(store)
    response = api_client.post(_route(parent), json=body)
    assert response.status_code == 422
    error = _error(response)
    assert error["field"] == field and words in error["message"]
    assert store.list("alpha")[1] == 1  # nothing created


def test_submitting_method_posttrain_inherits_and_refuses_a_different_model(api_client, store):
    parent = _parent(store)
    body = {"method": "posttrain", "posttrain": {"job": parent, "candidate": CANDIDATE, "tokens": 1024}}
    job = api_client.post("/v1/jobs", json=body).json()
    assert job["spec"]["model"] == PRUNE["model"] | {"dtype": "float32", "revision": None}
    assert job["spec"]["seed"] == 7 and job["spec"]["resources"]["gpus_per_evaluator"] == 0.5
    same = api_client.post("/v1/jobs", json={**body, "model": job["spec"]["model"], "seed": 7,
                                              "resources": {"gpus_per_evaluator": 1}})
    assert same.status_code == 201 and same.json()["spec"]["resources"]["gpus_per_evaluator"] == 1
    for field, value in (("model", {"source": "builtin:tiny-llama"}), ("seed", 3), ("data", {"seq_len": 32})):
        response = api_client.post("/v1/jobs", json={**body, field: value})
        assert response.status_code == 422 and _error(response)["field"] == field, response.text
        assert "parent" in _error(response)["message"]


def test_the_idempotency_key_returns_the_first_follow_up(api_client, store):
    parent = _parent(store)
    first = api_client.post(_route(parent), json={"idempotency_key": "post-1"}).json()
    again = api_client.post(_route(parent), headers={"Idempotency-Key": "post-1"}).json()
    assert first["id"] == again["id"] and store.list("alpha")[1] == 2
    response = api_client.post(_route(parent), json={"idempotency_key": "a"}, headers={"Idempotency-Key": "b"})
    assert response.status_code == 422 and _error(response)["field"] == "idempotency_key"


def test_quotas_count_follow_up_jobs(api_client, store, service_settings):
    parent = _parent(store)
    settings = service_settings.model_copy(update={"max_active_jobs_per_tenant": 1})
    api_client.app.state.settings = settings
    assert api_client.post(_route(parent)).status_code == 201
    response = api_client.post(_route(parent))
    assert response.status_code == 429 and _error(response)["code"] == "too_many_active_jobs"


# ---- client and CLI against a real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from darwinfront.stack import EmbeddedStack

    with EmbeddedStack(tmp_path_factory.mktemp("posttrain-api"), port=0, driver=False) as running:
        yield running


def test_the_client_and_the_cli_submit_a_follow_up(stack, capsys):
    import redis

    from darwinfront.cli import main
    from darwinfront.client import ApiError, Client

    connection = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    store = JobStore(connection)
    parent = _parent(store, tenant="local")
    with Client(stack.url, stack.key) as client:
        job = client.posttrain(parent, CANDIDATE, tokens=2048, lr=None, idempotency_key="cli-1")
        assert job.spec["posttrain"]["tokens"] == 2048 and job.spec["posttrain"]["lr"] == 1e-4
        with pytest.raises(ApiError) as caught:
            client.posttrain(parent, "nope")
        assert (caught.value.status, caught.value.field, caught.value.code) == (404, "candidate_id",
                                                                                "candidate_not_found")
    assert main(["--url", stack.url, "--key", stack.key, "posttrain", parent, CANDIDATE, "--tokens", "4096",
                 "--loss", "ce", "--lr", "0.001"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert store.get(job_id).spec["posttrain"] | {"job": parent, "tokens": 4096, "loss": "ce", "lr": 0.001} == \
        store.get(job_id).spec["posttrain"]
    assert main(["--url", stack.url, "--key", stack.key, "posttrain", "ffffffffffffffff", CANDIDATE]) == 2
    err = capsys.readouterr().err
    assert "job_id: no job 'ffffffffffffffff'" in err and "Traceback" not in err
    connection.close()
