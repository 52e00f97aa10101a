"""Evaluate over the API: the follow-up route, `POST /v1/jobs` with method evaluate, the scores route, the client
and the CLI. A real (embedded) Redis; no driver: the tests write what the drivers write."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from test_posttrain_api import KV, PRUNE, _error, _parent

from darwinfront import cli
from darwinfront.client import Client
from darwinfront.core.status import JobStatus
from darwinfront.core.store import JobStore

pytest_plugins = ["service_fixtures"]

CANDIDATE = "t0-g1-c2"
SCORES = {"darwinfront_pydoc_mc": {"metric": "acc", "value": 0.5, "stderr": 0.1, "dense": {"value": 0.75,
                                   "stderr": 0.09}, "delta": -0.25, "job": "e", "limit": 8}}


def _route(job_id: str, candidate: str = CANDIDATE) -> str:
    return f"/v1/jobs/{job_id}/candidates/{candidate}/evaluate"


def test_the_route_creates_a_follow_up_job_that_inherits_the_parent(api_client: TestClient, store: JobStore):
    parent = _parent(store)
    response = api_client.post(_route(parent), json={"tasks": ["arc_easy", "piqa"], "limit": 50, "name": "bench"})
    assert response.status_code == 201, response.text
    job = response.json()
    spec = job["spec"]
    assert spec["method"] == "evaluate" and job["name"] == "bench"
    assert spec["evaluate"] == {"job": parent, "candidate": CANDIDATE, "tasks": ["arc_easy", "piqa"], "limit": 50,
                                "num_fewshot": None, "batch_size": 8, "seed": 0}
    parent_spec = store.get(parent).spec
    assert {k: spec[k] for k in ("model", "data", "seed", "resources")} == {
        k: parent_spec[k] for k in ("model", "data", "seed", "resources")}
    assert store.claim("test-driver", timeout=0) == job["id"]


@pytest.mark.parametrize("spec", [KV, PRUNE])
def test_kv_and_prune_parents_are_taken_and_a_posttrain_job_too(api_client, store, spec):
    parent = _parent(store, spec)
    assert api_client.post(_route(parent), json={"tasks": ["piqa"]}).status_code == 201
    post = api_client.post(f"/v1/jobs/{parent}/candidates/{CANDIDATE}/posttrain")
    if spec is PRUNE:
        follow_up = post.json()["id"]
        store.put_result(follow_up, CANDIDATE, {"candidate_id": CANDIDATE})
        assert api_client.post(_route(follow_up), json={"tasks": ["piqa"]}).status_code == 201


def test_unknown_parents_candidates_and_another_tenant_s_job_are_404(api_client, store, other_headers):
    parent = _parent(store)
    body = {"tasks": ["piqa"]}
    cases = [
        (api_client.post(_route("ffffffffffffffff"), json=body), "job_not_found", "job_id"),
        (api_client.post(_route(parent, "t9-g9-c9"), json=body), "candidate_not_found", "candidate_id"),
        (api_client.post(_route(parent), json=body, headers=other_headers), "job_not_found", "job_id"),
        (api_client.post("/v1/jobs", json={"method": "evaluate", "evaluate": {"job": parent, "candidate": "x",
                                                                               "tasks": ["piqa"]}}),
         "candidate_not_found", "evaluate.candidate"),
        (api_client.get(f"/v1/jobs/{parent}/candidates/x/scores"), "candidate_not_found", None),
        (api_client.get(f"/v1/jobs/{parent}/candidates/{CANDIDATE}/scores", headers=other_headers),
         "job_not_found", None),
    ]
    for response, code, field in cases:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == code
        if field is not None:
            assert _error(response)["field"] == field
    assert [j.id for j in store.list("alpha")[0]] == [parent]


def test_a_running_parent_is_409_and_an_evaluate_parent_422(api_client, store):
    running = _parent(store, status=JobStatus.running, candidate=None)
    response = api_client.post(_route(running), json={"tasks": ["piqa"]})
    assert response.status_code == 409 and _error(response)["code"] == "job_not_finished"
    evaluate = api_client.post(_route(_parent(store)), json={"tasks": ["piqa"]}).json()["id"]
    store.put_result(evaluate, CANDIDATE, {"candidate_id": CANDIDATE})
    response = api_client.post(_route(evaluate), json={"tasks": ["piqa"]})
    assert response.status_code == 422 and _error(response)["code"] == "unsupported_parent"
    assert "evaluate job" in _error(response)["message"] and "kv_precision" in _error(response)["message"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({}, "tasks", "Field required"),
        ({"tasks": []}, "tasks", "at least 1"),
        ({"tasks": ["arc easy"]}, "tasks.0", "pattern"),
        ({"tasks": ["piqa"], "limit": 0}, "limit", "greater than or equal to 1"),
        ({"tasks": ["piqa"], "job": "x"}, "job", "Extra inputs"),
    ],
)
def test_bad_options_are_422_naming_the_field(api_client, store, body, field, words):
    parent = _parent(store)
    response = api_client.post(_route(parent), json=body)
    assert response.status_code == 422, response.text
    error = _error(response)
    assert error["field"] == field and words in error["message"]
    assert store.list("alpha")[1] == 1


def test_scores_show_in_the_front_the_scores_route_the_client_and_the_cli(api_client, store, capsys, monkeypatch):
    parent = _parent(store)
    store.set_front(parent, [{"candidate_id": CANDIDATE, "objectives": {"kl": 0.1, "params": 1000}}],
                    objectives=[{"name": "kl", "direction": "minimize", "unit": "nats"},
                                {"name": "params", "direction": "minimize", "unit": "parameters"}])
    assert api_client.get(f"/v1/jobs/{parent}/candidates/{CANDIDATE}/scores").json() == {}
    store.merge_scores(parent, CANDIDATE, SCORES)
    [point] = api_client.get(f"/v1/jobs/{parent}/front").json()["points"]
    assert point["scores"] == SCORES
    assert api_client.get(f"/v1/jobs/{parent}/candidates/{CANDIDATE}/scores").json() == SCORES

    from service_fixtures import API_KEY  # after pytest_plugins registered it (assertion rewriting)

    client = Client("http://testserver", API_KEY)
    client.http = api_client  # the app in process, with its API key
    assert client.scores(parent, CANDIDATE) == SCORES
    job = client.evaluate(parent, CANDIDATE, "darwinfront_pydoc_mc, piqa", limit=4)
    assert job.spec["evaluate"]["tasks"] == ["darwinfront_pydoc_mc", "piqa"] and job.spec["evaluate"]["limit"] == 4

    monkeypatch.setattr(cli, "Client", lambda url, key: client)
    assert cli.main(["front", parent]) == 0
    table = capsys.readouterr().out
    assert "darwinfront_pydoc_mc" in table and "0.5000 (0.7500)" in table
    assert cli.main(["evaluate", parent, CANDIDATE, "--tasks", "piqa", "--num-fewshot", "2"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert store.get(job_id).spec["evaluate"]["num_fewshot"] == 2
