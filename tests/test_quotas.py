"""Per-tenant quotas: active jobs (429) and planned evaluations (422), in the store's transaction and the API."""

from __future__ import annotations

import threading

import pytest
import redis
from fastapi.testclient import TestClient

from darwinfront.core import keys
from darwinfront.core.methods import parse_spec
from darwinfront.core.quotas import EvaluationBudgetExceeded, Quota, TooManyActiveJobs
from darwinfront.core.settings import Settings
from darwinfront.core.status import JobStatus
from darwinfront.core.store import JobStore
from service.app import create_app
from service.embedded import EmbeddedRedis

pytest_plugins = ["service_fixtures"]

SPEC = {"model": {"source": "builtin:tiny-llama"}}
GOOD = {"model": {"source": "builtin:tiny-llama"}, "search": {"generations": 2, "offspring": 4}}


def test_quota_check_known_answers() -> None:
    quota = Quota(max_active_jobs=3, max_active_evaluations=1000)
    quota.check([], 1000)
    quota.check([400, 500], 100)
    with pytest.raises(EvaluationBudgetExceeded, match=r"plans 101 .* 2 active jobs already plan 900; .* is 1000"):
        quota.check([400, 500], 101)
    with pytest.raises(EvaluationBudgetExceeded, match=r"^search: the job plans 1001 candidate evaluations;"):
        quota.check([], 1001)
    with pytest.raises(TooManyActiveJobs, match=r"already has 3 queued or running jobs, the most allowed \(3\)"):
        quota.check([1, 1, 1], 1)


def test_active_jobs_are_capped_and_finished_ones_free_their_slot(store: JobStore) -> None:
    quota = Quota(max_active_jobs=2, max_active_evaluations=10**9)
    first = store.create("alpha", SPEC, planned=10, quota=quota).id
    second = store.create("alpha", SPEC, planned=10, quota=quota).id
    with pytest.raises(TooManyActiveJobs):
        store.create("alpha", SPEC, planned=10, quota=quota)
    assert store.list("alpha")[1] == 2
    store.create("beta", SPEC, planned=10, quota=quota)  # another tenant's count is its own
    assert store.claim("driver", timeout=0) == first  # running still counts
    with pytest.raises(TooManyActiveJobs):
        store.create("alpha", SPEC, planned=10, quota=quota)
    store.set_status(first, JobStatus.succeeded)
    third = store.create("alpha", SPEC, planned=10, quota=quota).id
    store.request_cancel(second)  # a cancelled queued job frees its slot at once
    store.create("alpha", SPEC, planned=10, quota=quota)
    queued = store.list("alpha", status="queued")[0]
    assert len(queued) == 2 and third in {job.id for job in queued}


def test_planned_evaluations_are_summed_over_active_jobs(store: JobStore, redis_client: redis.Redis) -> None:
    quota = Quota(max_active_jobs=100, max_active_evaluations=700)
    running = store.create("alpha", SPEC, planned=300, quota=quota).id
    store.claim("driver", timeout=0)
    store.create("alpha", SPEC, planned=300, quota=quota)
    keys_before = set(redis_client.keys("*"))
    with pytest.raises(EvaluationBudgetExceeded, match="already plan 600"):
        store.create("alpha", SPEC, planned=101, quota=quota)
    assert set(redis_client.keys("*")) == keys_before  # a refused job writes nothing
    store.create("alpha", SPEC, planned=100, quota=quota)
    store.set_status(running, JobStatus.failed, error="boom")
    store.create("alpha", SPEC, planned=300, quota=quota)
    assert redis_client.hget(keys.job(running), "planned") == "300"


def test_an_idempotent_retry_is_answered_even_at_the_quota(store: JobStore) -> None:
    quota = Quota(max_active_jobs=1, max_active_evaluations=10**9)
    first = store.create("alpha", SPEC, idempotency_key="k1", planned=5, quota=quota)
    assert store.create("alpha", SPEC, idempotency_key="k1", planned=5, quota=quota).id == first.id
    with pytest.raises(TooManyActiveJobs):
        store.create("alpha", SPEC, idempotency_key="k2", planned=5, quota=quota)


def test_concurrent_submissions_cannot_pass_the_quota_together(store: JobStore, redis_server: EmbeddedRedis) -> None:
    quota = Quota(max_active_jobs=3, max_active_evaluations=10**9)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def submit() -> None:
        own = JobStore(redis.Redis.from_url(redis_server.url, decode_responses=True))
        start.wait()
        try:
            own.create("alpha", SPEC, planned=1, quota=quota)
            outcomes.append("created")
        except TooManyActiveJobs:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 5
    assert store.list("alpha")[1] == 3


@pytest.fixture
def quota_client(service_settings: Settings, redis_client: redis.Redis):
    from service_fixtures import API_KEY, bearer  # after pytest_plugins registered it (assertion rewriting)

    planned = parse_spec(GOOD).planned_evaluations()
    settings = service_settings.model_copy(
        update={"max_active_jobs_per_tenant": 2, "max_active_evaluations_per_tenant": 2 * planned + 1}
    )
    with TestClient(create_app(settings), headers=bearer(API_KEY)) as client:
        yield client, planned


def test_the_api_answers_429_and_422_with_clear_messages(quota_client, other_headers: dict, store: JobStore) -> None:
    client, planned = quota_client
    bigger = {**GOOD, "search": {"generations": 3, "offspring": 4}}
    assert [client.post("/v1/jobs", json=GOOD).status_code for _ in range(2)] == [201, 201]
    refused = client.post("/v1/jobs", json=GOOD)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_active_jobs"
    assert "already has 2 queued or running jobs" in refused.json()["error"]["message"]
    assert client.post("/v1/jobs", json=GOOD, headers=other_headers).status_code == 201  # tenant beta
    first = client.get("/v1/jobs").json()["items"][-1]["id"]
    assert client.post(f"/v1/jobs/{first}/cancel").status_code == 202
    over = client.post("/v1/jobs", json=bigger)
    assert over.status_code == 422
    error = over.json()["error"]
    assert error["code"] == "budget_exceeded" and error["field"] == "search"
    assert f"already plan {planned}" in error["message"] and f"is {2 * planned + 1}" in error["message"]
    assert client.post("/v1/jobs", json=GOOD).status_code == 201
    assert store.list("alpha")[1] == 3 and store.list("beta")[1] == 1
