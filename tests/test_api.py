"""The REST API through FastAPI's TestClient, on a real (embedded) Redis."""

from __future__ import annotations

import hashlib
from pathlib import Path

import redis
from fastapi.testclient import TestClient

from darwinfront.core import keys, methods
from darwinfront.core.settings import Settings
from darwinfront.core.store import JobStore
from service.app import create_app
from service.embedded import EmbeddedRedis

pytest_plugins = ["service_fixtures"]

TENANT, OTHER_TENANT = "alpha", "beta"  # the tenants of the fixture keys

GOOD = {"model": {"source": "builtin:tiny-llama"}, "search": {"generations": 2, "offspring": 4}}


def _with(**changes: dict) -> dict:
    spec = {key: dict(value) for key, value in GOOD.items()}
    for section, fields in changes.items():
        spec[section] = {**spec.get(section, {}), **fields} if isinstance(fields, dict) else fields
    return spec


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    return body["error"]


def test_create_then_read_a_job(api_client: TestClient, store: JobStore) -> None:
    response = api_client.post("/v1/jobs", json={**GOOD, "name": "first"})
    assert response.status_code == 201
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["name"] == "first"
    assert {k: job["spec"]["search"][k] for k in GOOD["search"]} == GOOD["search"]
    assert job["spec"]["prune"]["targets"] == [0.5]
    assert store.get(job["id"]).tenant == TENANT
    read = api_client.get(f"/v1/jobs/{job['id']}").json()
    assert read == job


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[dict | bytes, str, str]]:
    """name -> (body, field named in the error, words the message must hold)."""
    models, corpora = tmp_path / "models", tmp_path / "corpora"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    (corpora / "empty.txt").write_text("")
    return {
        "unknown model directory": (_with(model={"source": str(models / "nope")}), "model.source", "does not exist"),
        "target zero": (_with(prune={"targets": [0.0]}), "prune.targets.0", "greater than 0"),
        "target one": (_with(prune={"targets": [1]}), "prune.targets.0", "less than 1"),
        "zero generations": (_with(search={"generations": 0}), "search.generations", "greater than or equal to 1"),
        "oversize budget": (
            _with(search={"generations": 10_000, "offspring": 512}), "search", "this server allows at most 100000"
        ),
        "unknown method": (_with(method="quantize"), "method", "'structured_prune'"),
        "malformed JSON": (b'{"model": {"source": "builtin:tiny-llama"', "body", "not valid JSON"),
        "wrong type": (_with(search={"generations": "ten"}), "search.generations", "valid integer"),
        "model not an object": (_with(model="builtin:tiny-llama"), "model", "valid dictionary"),
        "unknown field": (_with(prune={"sparsity": 0.5}), "prune.sparsity", "Extra inputs are not permitted"),
        "unknown implant": (_with(prune={"implants": ["ffn"]}), "prune.implants.0", "'attn' or 'mlp'"),
        "bad serene": (_with(prune={"train_serene": {"strength": 1}}), "prune.train_serene.strength", "less than 1"),
        "model outside roots": (
            _with(model={"source": str(tmp_path / "elsewhere")}), "model.source", "outside the allowed directories"
        ),
        "empty calibration file": (_with(data={"source": str(corpora / "empty.txt")}), "data.source", "is empty"),
        "unknown builtin": (_with(model={"source": "builtin:gpt-9"}), "model.source", "unknown builtin model"),
        "missing model": ({"search": {"generations": 1}}, "model", "Field required"),
    }


def test_bad_inputs_are_refused_by_name_and_create_nothing(
    api_client: TestClient, store: JobStore, tmp_path: Path
) -> None:
    for name, (body, field, words) in _bad_inputs(tmp_path).items():
        if isinstance(body, bytes):
            response = api_client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        else:
            response = api_client.post("/v1/jobs", json=body)
        error = _error(response)
        assert response.status_code == 422, name
        assert error["field"] == field, (name, error)
        assert words in error["message"] and field in error["message"], (name, error)
        assert "Traceback" not in response.text
    assert store.list(TENANT) == ([], 0)


def test_a_valid_local_model_and_corpus_are_accepted(api_client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "models" / "llama").mkdir()
    (tmp_path / "models" / "llama" / "config.json").write_text("{}")
    (tmp_path / "corpora" / "text.txt").write_text("some text\n")
    corpus = tmp_path / "corpora" / "text.txt"
    body = _with(model={"source": str(tmp_path / "models" / "llama")}, data={"source": str(corpus)})
    assert api_client.post("/v1/jobs", json=body).status_code == 201


def test_keys_are_required(api_client: TestClient, store: JobStore) -> None:
    for credentials in ("", "Bearer df_wrong_key_0000", "Basic dXNlcjpwdw=="):
        headers = {"Authorization": credentials}
        for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/0123456789abcdef")):
            response = api_client.request(method, path, json=GOOD, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert _error(response)["code"] == "unauthorized"
    assert store.list(TENANT)[1] == 0
    for open_path in ("/healthz", "/docs", "/openapi.json"):
        assert api_client.get(open_path, headers={"Authorization": ""}).status_code == 200


def test_another_tenants_job_is_not_found(api_client: TestClient, store: JobStore, other_headers: dict) -> None:
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    store.put_result(job_id, "c0", {"x": 1})
    other = other_headers
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/front"), ("GET", f"/v1/jobs/{job_id}/events"),
        ("POST", f"/v1/jobs/{job_id}/cancel"), ("GET", f"/v1/jobs/{job_id}/candidates/c0/config"),
        ("GET", f"/v1/jobs/{job_id}/candidates/c0/model"),
    ):
        response = api_client.request(method, path, headers=other)
        assert response.status_code == 404 and _error(response)["code"] == "job_not_found", path
    assert api_client.get("/v1/jobs", headers=other).json()["total"] == 0
    assert store.get(job_id).status == "queued"
    assert store.list(OTHER_TENANT)[1] == 0


def test_unknown_job_and_candidate(api_client: TestClient) -> None:
    response = api_client.get("/v1/jobs/ffffffffffffffff")
    assert response.status_code == 404
    assert _error(response) == {"code": "job_not_found", "message": "no job 'ffffffffffffffff'", "field": None}
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    response = api_client.get(f"/v1/jobs/{job_id}/candidates/t0-g1-c2/config")
    assert response.status_code == 404 and _error(response)["code"] == "candidate_not_found"
    response = api_client.get(f"/v1/jobs/{job_id}/candidates/t0-g1-c2/model")
    assert response.status_code == 404 and "has no exported model" in _error(response)["message"]


def test_pagination_and_status_filter(api_client: TestClient, store: JobStore) -> None:
    ids = [api_client.post("/v1/jobs", json=GOOD).json()["id"] for _ in range(5)]
    pages = [api_client.get("/v1/jobs", params={"offset": offset, "limit": 2}).json() for offset in (0, 2, 4)]
    assert [p["total"] for p in pages] == [5, 5, 5]
    assert [job["id"] for page in pages for job in page["items"]] == ids[::-1]
    assert pages[2]["offset"] == 4 and pages[2]["limit"] == 2 and len(pages[2]["items"]) == 1
    store.claim("driver", timeout=0)
    running = api_client.get("/v1/jobs", params={"status": "running"}).json()
    assert running["total"] == 1 and running["items"][0]["id"] == ids[0]
    for params, field in (({"limit": 101}, "limit"), ({"limit": 0}, "limit"), ({"offset": -1}, "offset"),
                          ({"status": "sleeping"}, "status")):
        response = api_client.get("/v1/jobs", params=params)
        assert response.status_code == 422 and _error(response)["field"] == field


def test_cancel(api_client: TestClient, store: JobStore) -> None:
    queued = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    response = api_client.post(f"/v1/jobs/{queued}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    again = api_client.post(f"/v1/jobs/{queued}/cancel")
    assert again.status_code == 409 and _error(again)["code"] == "invalid_transition"
    running = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    assert store.claim("driver", timeout=0) == running
    response = api_client.post(f"/v1/jobs/{running}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "running"
    assert store.cancel_requested(running)


def test_idempotency_key_by_header_or_field(api_client: TestClient, store: JobStore) -> None:
    first = api_client.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "submit-7"}).json()
    second = api_client.post("/v1/jobs", json={**GOOD, "idempotency_key": "submit-7"}).json()
    assert first["id"] == second["id"] and store.list(TENANT)[1] == 1
    clash = api_client.post("/v1/jobs", json={**GOOD, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"})
    assert clash.status_code == 422 and _error(clash)["field"] == "idempotency_key"
    assert store.list(TENANT)[1] == 1


def test_front_and_events(api_client: TestClient, store: JobStore) -> None:
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    assert api_client.get(f"/v1/jobs/{job_id}/front").json() == {
        "job_id": job_id, "objectives": [], "points": [], "updated_at": None, "generation": None,
    }
    point = {"candidate_id": "t0-g3-c1", "objectives": {"kl": 0.125, "params": 0.5}, "target": 0.5,
             "generation": 3, "trial": 12}
    store.set_front(job_id, [point], objectives=methods.get("structured_prune").stored_objectives())
    front = api_client.get(f"/v1/jobs/{job_id}/front").json()
    assert front["points"] == [point] and front["generation"] == 3
    assert [(o["name"], o["direction"], o["unit"]) for o in front["objectives"]] == [
        ("kl", "minimize", "nats"), ("params", "minimize", "parameters")]
    store.append_event(job_id, "generation", {"generation": 1})
    store.append_event(job_id, "generation", {"generation": 2})
    batch = api_client.get(f"/v1/jobs/{job_id}/events", params={"limit": 2}).json()
    assert [e["kind"] for e in batch["events"]] == ["queued", "generation"]
    rest = api_client.get(f"/v1/jobs/{job_id}/events", params={"after": batch["last_id"]}).json()
    assert [e["data"] for e in rest["events"]] == [{"generation": 2}]
    bad = api_client.get(f"/v1/jobs/{job_id}/events", params={"after": "latest"})
    assert bad.status_code == 422 and _error(bad)["field"] == "after"


def test_configuration_and_model_downloads(api_client: TestClient, store: JobStore, service_settings: Settings):
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    store.put_result(job_id, "t0-g3-c1", {"heads": [4, 2], "channels": [64, 48]})
    response = api_client.get(f"/v1/jobs/{job_id}/candidates/t0-g3-c1/config")
    assert response.json() == {"heads": [4, 2], "channels": [64, 48]}
    assert response.headers["content-disposition"] == f'attachment; filename="{job_id}-t0-g3-c1.json"'
    folder = service_settings.artifacts_dir / job_id
    folder.mkdir(parents=True)
    payload = b"\x1f\x8b fake archive bytes"
    (folder / "t0-g3-c1.tar.gz").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    store.put_artifact(job_id, "t0-g3-c1", {"path": f"{job_id}/t0-g3-c1.tar.gz", "size": 22, "sha256": digest})
    model = api_client.get(f"/v1/jobs/{job_id}/candidates/t0-g3-c1/model")
    assert model.status_code == 200 and model.content == payload
    assert model.headers["x-checksum-sha256"] == digest and "t0-g3-c1.tar.gz" in model.headers["content-disposition"]


def test_model_download_never_leaves_the_jobs_artifact_folder(
    api_client: TestClient, store: JobStore, service_settings: Settings, tmp_path: Path
) -> None:
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    folder = service_settings.artifacts_dir / job_id
    folder.mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    (folder / "c1.tar.gz").symlink_to(secret)
    store.put_artifact(job_id, "c1", {"path": f"{job_id}/c1.tar.gz", "size": 1, "sha256": ""})
    store.put_artifact(job_id, "c2", {"path": f"{job_id}/gone.tar.gz", "size": 1, "sha256": ""})
    for candidate in ("c1", "c2"):
        response = api_client.get(f"/v1/jobs/{job_id}/candidates/{candidate}/model")
        assert response.status_code == 404 and _error(response)["code"] == "artifact_missing"
        assert "do not serve" not in response.text


def test_unexpected_errors_hide_their_traceback(
    service_settings: Settings, redis_client: redis.Redis, store: JobStore, other_headers: dict
) -> None:
    job_id = store.create(OTHER_TENANT, GOOD).id
    redis_client.hset(keys.job(job_id), "spec", "{not json")  # a corrupt record
    app = create_app(service_settings)
    with TestClient(app, headers=other_headers, raise_server_exceptions=False) as client:
        response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 500
    assert _error(response) == {"code": "internal_error", "message": "internal server error", "field": None}


def test_health_and_readiness(service_settings: Settings, tmp_path: Path, other_headers: dict) -> None:
    with EmbeddedRedis(tmp_path / "own") as server:
        settings = service_settings.model_copy(update={"redis_url": server.url})
        with TestClient(create_app(settings), headers=other_headers) as client:
            assert client.get("/healthz").json()["status"] == "ok"
            assert client.get("/readyz").status_code == 200
            server.stop()
            ready = client.get("/readyz")
            assert ready.status_code == 503 and _error(ready)["code"] == "not_ready"
            listing = client.get("/v1/jobs")
            assert listing.status_code == 503 and _error(listing)["code"] == "store_unavailable"
            assert client.get("/healthz").status_code == 200


def test_cors_only_for_configured_origins(service_settings: Settings, redis_client: redis.Redis) -> None:
    settings = service_settings.model_copy(update={"cors_origins": ["https://ui.example"]})
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with TestClient(create_app(settings)) as client:
        allowed = client.options("/v1/jobs", headers={"Origin": "https://ui.example", **preflight})
        refused = client.options("/v1/jobs", headers={"Origin": "https://evil.example", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ui.example"
    assert "access-control-allow-origin" not in refused.headers


def test_progress_shows_what_the_driver_reported(api_client: TestClient, store: JobStore) -> None:
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    assert api_client.get(f"/v1/jobs/{job_id}").json()["progress"] == {}
    report = {"generation": 1, "generations": 2, "evaluations": 9, "planned": 17, "best": {"0.5": 0.31}}
    store.set_progress(job_id, report)
    assert api_client.get(f"/v1/jobs/{job_id}").json()["progress"] == report
