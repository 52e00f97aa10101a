"""API hardening: body limit, one error shape, keys kept out of logs and compared in constant time, downloads and
paths confined, CORS off by default, pagination bounds, and a store that rides out a Redis restart."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient

from darwinfront.core import keys
from darwinfront.core.settings import Settings
from darwinfront.core.store import JobStore, connect
from darwinfront.stack import free_port
from service import auth
from service.app import create_app
from service.auth import KeyRing, generate_key
from service.embedded import EmbeddedRedis

pytest_plugins = ["service_fixtures"]

GOOD = {"model": {"source": "builtin:tiny-llama"}, "search": {"generations": 2, "offspring": 4}}
LIMIT = 2048


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["message"], body
    return body["error"]


@pytest.fixture
def tight(service_settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    """A client of an app with a 2 KiB body limit and one active job per tenant, sending the alpha key."""
    from service_fixtures import API_KEY, bearer  # after pytest_plugins registered it (assertion rewriting)

    settings = service_settings.model_copy(update={"max_body_bytes": LIMIT, "max_active_jobs_per_tenant": 1})
    with TestClient(create_app(settings), headers=bearer(API_KEY), raise_server_exceptions=False) as client:
        yield client


def _padded(size: int) -> bytes:
    head = b'{"model": {"source": "builtin:tiny-llama"}, "search": {"generations": 1}, "name": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def test_bodies_over_the_limit_are_refused_before_parsing(tight: TestClient, store: JobStore) -> None:
    declared = tight.post("/v1/jobs", content=_padded(LIMIT + 1), headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert _error(declared) == {
        "code": "payload_too_large", "field": "body",
        "message": f"the request body is larger than this server accepts ({LIMIT} bytes)",
    }
    body = _padded(LIMIT + 1)
    chunked = tight.post("/v1/jobs", content=iter([body[:1000], body[1000:]]),
                         headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and _error(chunked)["code"] == "payload_too_large"
    assert store.list("alpha")[1] == 0
    small = b'{"model": {"source": "builtin:tiny-llama"}, "search": {"generations": 1}}'
    within = tight.post("/v1/jobs", content=iter([small[:10], small[10:]]),
                        headers={"Content-Type": "application/json"})
    assert within.status_code == 201 and within.json()["spec"]["search"]["generations"] == 1


def test_every_error_has_the_same_shape(tight: TestClient, store: JobStore, redis_client: redis.Redis) -> None:
    job_id = tight.post("/v1/jobs", json=GOOD).json()["id"]
    responses = {
        401: tight.get("/v1/jobs", headers={"Authorization": "Bearer df_not_a_key_000"}),
        404: tight.get("/v2/nothing/here"),
        405: tight.delete("/v1/jobs"),
        413: tight.post("/v1/jobs", content=_padded(LIMIT + 1), headers={"Content-Type": "application/json"}),
        422: tight.get("/v1/jobs", params={"limit": 0}),
        429: tight.post("/v1/jobs", json=GOOD),
    }
    tight.post(f"/v1/jobs/{job_id}/cancel")
    responses[409] = tight.post(f"/v1/jobs/{job_id}/cancel")
    redis_client.hset(keys.job(job_id), "spec", "{corrupt")
    responses[500] = tight.get(f"/v1/jobs/{job_id}")
    codes = {status: (response.status_code, _error(response)["code"]) for status, response in responses.items()}
    assert codes == {
        401: (401, "unauthorized"), 404: (404, "not_found"), 405: (405, "method_not_allowed"),
        413: (413, "payload_too_large"), 422: (422, "invalid_request"), 429: (429, "too_many_active_jobs"),
        409: (409, "invalid_transition"), 500: (500, "internal_error"),
    }
    assert responses[405].headers["allow"] == "GET, POST"  # both routes on the path, not just the first
    assert "Traceback" not in responses[500].text and "corrupt" not in responses[500].text


def test_keys_are_compared_against_every_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path, api_keys={"df_env_key_one_1": "one", "df_env_key_two_2": "two"})
    stored = [generate_key(settings, tenant="three") for _ in range(3)]
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    ring = KeyRing(settings, recheck_seconds=0)
    assert ring.tenant_for("df_env_key_one_1") == "one"  # the first entry matches; the other four are still compared
    assert ring.tenant_for(stored[2]) == "three"
    assert ring.tenant_for("df_unknown_key_0") is None
    assert len(compared) == 15
    assert all(len(a) == len(b) == 64 for a, b in compared)  # digests, never the key itself


@pytest.fixture
def live_server(service_settings: Settings, redis_client: redis.Redis) -> Iterator[str]:
    """The app under a real uvicorn (access log on, logging left to pytest) in a thread; yields its URL."""
    port = free_port()
    config = uvicorn.Config(create_app(service_settings), host="127.0.0.1", port=port, log_config=None,
                            access_log=True, log_level="debug")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_no_key_or_token_reaches_the_logs(live_server: str, caplog: pytest.LogCaptureFixture) -> None:
    from service_fixtures import API_KEY

    wrong = "df_wrong_but_secret_4f1e"
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=live_server) as http:
        assert http.post("/v1/jobs", json=GOOD, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 201
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        assert http.get("/v1/jobs", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401
    server_side = [r for r in caplog.records if r.name.startswith(("uvicorn", "service", "fastapi", "starlette"))]
    lines = [record.getMessage() for record in server_side]
    assert any('"POST /v1/jobs HTTP/1.1" 201' in line for line in lines), lines  # the access log was captured
    assert any('"GET /v1/jobs HTTP/1.1" 401' in line for line in lines), lines
    everything = caplog.text + "".join(repr(r.args) for r in caplog.records)  # the client's own logs too
    assert API_KEY not in everything and wrong not in everything
    server_text = "\n".join(lines) + "".join(repr(r.args) for r in server_side)
    assert "bearer" not in server_text.lower() and "authorization" not in server_text.lower()


def test_downloads_cannot_leave_the_jobs_artifact_folder(
    api_client: TestClient, store: JobStore, redis_client: redis.Redis, service_settings: Settings, tmp_path: Path
) -> None:
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    other = store.create("beta", GOOD).id
    for bad in ("../secret.tar.gz", f"/{job_id}/x.tar.gz", f"{other}/x.tar.gz", f"{job_id}/../{other}/x.tar.gz"):
        with pytest.raises(ValueError, match="inside the job's folder"):
            store.put_artifact(job_id, "c1", {"path": bad, "size": 1, "sha256": ""})
    (service_settings.artifacts_dir / other).mkdir(parents=True)
    (service_settings.artifacts_dir / other / "x.tar.gz").write_bytes(b"beta's model")
    (tmp_path / "secret.tar.gz").write_bytes(b"not for download")
    for bad in (f"{other}/x.tar.gz", f"{job_id}/../{other}/x.tar.gz", "../../secret.tar.gz"):
        redis_client.hset(keys.artifacts(job_id), "c1", f'{{"path": "{bad}", "size": 1, "sha256": ""}}')
        response = api_client.get(f"/v1/jobs/{job_id}/candidates/c1/model")
        assert response.status_code == 404 and _error(response)["code"] == "artifact_missing", bad
        assert b"beta's model" not in response.content and b"not for download" not in response.content


def test_model_and_data_paths_stay_under_their_roots(api_client: TestClient, store: JobStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (tmp_path / "models" / "link").symlink_to(outside)
    (tmp_path / "corpora" / "text.txt").symlink_to(tmp_path / "api_keys.json")
    cases = {
        str(tmp_path / "models" / "link"): ("model.source", "outside the allowed directories"),
        str(tmp_path / "models" / ".." / "outside-model"): ("model.source", "must not contain '..'"),
        "~no_such_user_df/model": ("model.source", "unknown user"),
        str(tmp_path / "models" / ("n" * 300)): ("model.source", "does not exist"),  # a name too long
        "./a\x00b": ("model.source", "NUL"),
    }
    for source, (field, words) in cases.items():
        response = api_client.post("/v1/jobs", json={**GOOD, "model": {"source": source}})
        assert response.status_code == 422 and _error(response)["field"] == field, (source, response.text)
        assert words in _error(response)["message"], (source, response.text)
    data = api_client.post("/v1/jobs", json={**GOOD, "data": {"source": str(tmp_path / "corpora" / "text.txt")}})
    assert data.status_code == 422 and "outside the allowed directories" in _error(data)["message"]
    assert store.list("alpha")[1] == 0


def test_cors_is_off_unless_configured(api_client: TestClient) -> None:
    preflight = api_client.options("/v1/jobs", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
    })
    assert preflight.status_code == 405 and _error(preflight)["code"] == "method_not_allowed"
    simple = api_client.get("/v1/jobs", headers={"Origin": "https://ui.example"})
    assert simple.status_code == 200
    assert not any(name.startswith("access-control-") for name in {**preflight.headers, **simple.headers})


def test_pagination_and_event_ids_are_bounded(api_client: TestClient) -> None:
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    for params in ({"offset": 10**12}, {"limit": 101}):
        response = api_client.get("/v1/jobs", params=params)
        assert response.status_code == 422 and _error(response)["field"] in params
    assert api_client.get("/v1/jobs", params={"offset": 10**9}).json()["items"] == []
    for after in ("99999999999999999999-0", "18446744073709551615-18446744073709551615"):
        page = api_client.get(f"/v1/jobs/{job_id}/events", params={"after": after})
        assert page.status_code == 200 and page.json() == {"events": [], "last_id": after}
    first = api_client.get(f"/v1/jobs/{job_id}/events", params={"after": "0-99999999999999999999"}).json()
    assert [event["kind"] for event in first["events"]] == ["queued"]
    # The live stream hands its id to XREAD, which refuses ids past 64 bits: refused up front, not mid-stream.
    stream = api_client.get(f"/v1/jobs/{job_id}/stream", params={"after": "99999999999999999999-0"})
    assert stream.status_code == 422 and _error(stream)["field"] == "after"


def _wait_until_down(server: EmbeddedRedis) -> None:
    deadline = time.monotonic() + 10
    while server.running:
        assert time.monotonic() < deadline, "the server did not stop"
        time.sleep(0.01)


def test_the_store_and_the_api_ride_out_a_redis_restart(tmp_path: Path, other_headers: dict) -> None:
    with EmbeddedRedis(tmp_path / "own") as server:
        store = JobStore(connect(server.url))
        before = store.create("beta", GOOD, planned=15)
        store.set_progress(before.id, {"generation": 1, "evaluations": 8})
        impatient = JobStore(connect(server.url, retries=0))
        outage = threading.Thread(target=server.restart, kwargs={"down_seconds": 1.0})
        outage.start()
        _wait_until_down(server)
        with pytest.raises(redis.ConnectionError):
            impatient.get(before.id)
        started = time.monotonic()
        after = store.create("beta", GOOD, planned=15)  # waits for Redis to come back
        assert time.monotonic() - started > 0.2
        outage.join()
        assert store.get(before.id).progress == {"generation": 1, "evaluations": 8}
        assert store.list("beta")[1] == 2 and store.claim("d", timeout=0) == before.id
        assert store.claim("d", timeout=0) == after.id and store.claim("d", timeout=0) is None

        settings = Settings(redis_url=server.url, data_dir=tmp_path / "data", api_keys={"df_key_of_beta_0": "beta"})
        with TestClient(create_app(settings), headers={"Authorization": "Bearer df_key_of_beta_0"}) as client:
            outage = threading.Thread(target=server.restart, kwargs={"down_seconds": 1.0})
            outage.start()
            _wait_until_down(server)
            assert client.get("/readyz").status_code == 503  # readiness tells the truth at once
            reply = client.get(f"/v1/jobs/{before.id}")  # a request waits out the restart
            outage.join()
            assert reply.status_code == 200 and reply.json()["status"] == "running"


def test_a_crashed_redis_keeps_acknowledged_writes(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        store = JobStore(connect(server.url))
        job = store.create("alpha", GOOD, planned=15)
        store.put_result(job.id, "c1", {"heads": [1, 2]})
        assert not (tmp_path / "redis" / "darwinfront.rdb").exists()  # nothing saved but the append-only file
        # With `appendfsync everysec` Redis may hold a write back up to 2 s while an fsync is running, so a crash
        # can lose the last two seconds; what is older than that must come back.
        time.sleep(2.2)
        server.restart(kill=True)  # SIGKILL: no final save
        assert store.get(job.id).spec == job.spec and store.get_result(job.id, "c1") == {"heads": [1, 2]}
        assert not (tmp_path / "redis" / "darwinfront.rdb").exists()
