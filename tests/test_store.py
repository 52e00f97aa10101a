"""The job store contract, against a real (embedded) Redis."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import pytest
import redis

from darwinfront.core import keys, methods
from darwinfront.core.errors import CandidateNotFound, InvalidTransition, JobNotFound
from darwinfront.core.status import TERMINAL, JobStatus, check_transition
from darwinfront.core.store import JobStore
from service.embedded import EmbeddedRedis

pytest_plugins = ["service_fixtures"]

SPEC = {"model": {"source": "builtin:tiny-llama"}, "prune": {"targets": [0.3, 0.5]}}
ALLOWED = {
    ("queued", "running"), ("queued", "cancelled"), ("running", "succeeded"), ("running", "failed"),
    ("running", "cancelled"), ("running", "queued"),
}


@pytest.mark.parametrize("old", list(JobStatus))
@pytest.mark.parametrize("new", list(JobStatus))
def test_transition_table(old: JobStatus, new: JobStatus) -> None:
    if (old.value, new.value) in ALLOWED:
        check_transition(old, new)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(old, new)


def test_create_stores_a_queued_job(store: JobStore, redis_client: redis.Redis) -> None:
    job = store.create("alpha", SPEC)
    assert len(job.id) == 16 and int(job.id, 16) >= 0
    assert job.status is JobStatus.queued and job.spec == SPEC and job.progress == {}
    assert datetime.fromisoformat(job.created_at).tzinfo == UTC
    assert job.started_at is None and job.finished_at is None and job.driver is None
    assert store.get(job.id) == job
    assert redis_client.lrange(keys.queue(), 0, -1) == [job.id]
    assert [e["data"] for e in store.events(job.id)] == [{"status": "queued"}]


def test_a_failed_create_writes_nothing(store: JobStore, redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError):
        store.create("alpha", {"bad": float("nan")})
    with pytest.raises(ValueError, match="tenant"):
        store.create("a:b", SPEC)
    assert redis_client.dbsize() == 0


def test_status_changes_stamp_times_and_terminal_is_final(store: JobStore) -> None:
    job_id = store.create("alpha", SPEC).id
    assert store.claim("driver-1", timeout=0) == job_id
    running = store.get(job_id)
    assert running.status is JobStatus.running and running.driver == "driver-1" and running.started_at
    store.set_status(job_id, JobStatus.failed, error="out of memory")
    failed = store.get(job_id)
    assert failed.status is JobStatus.failed and failed.error == "out of memory" and failed.finished_at
    for later in JobStatus:
        with pytest.raises(InvalidTransition, match="final"):
            store.set_status(job_id, later)
    assert store.get(job_id).status is JobStatus.failed
    assert [(e["kind"], e["data"]["status"]) for e in store.events(job_id)] == [
        ("queued", "queued"), ("running", "running"), ("failed", "failed")
    ]
    assert store.events(job_id)[-1]["data"]["error"] == "out of memory"


def test_queued_cannot_skip_to_succeeded(store: JobStore) -> None:
    job_id = store.create("alpha", SPEC).id
    with pytest.raises(InvalidTransition, match="queued job cannot become succeeded"):
        store.set_status(job_id, "succeeded")
    with pytest.raises(JobNotFound):
        store.set_status("0" * 16, "running")


def test_claim_takes_jobs_oldest_first_and_each_once(store: JobStore) -> None:
    ids = [store.create("alpha", SPEC).id for _ in range(3)]
    assert [store.claim("d", timeout=0) for _ in range(3)] == ids
    assert store.claim("d", timeout=0) is None


def test_two_drivers_racing_claim_one_job_once(store: JobStore, redis_server: EmbeddedRedis) -> None:
    job_id = store.create("alpha", SPEC).id
    won: list[str | None] = []

    def race(name: str) -> None:
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        won.append(JobStore(client).claim(name, timeout=0.3))
        client.close()

    threads = [threading.Thread(target=race, args=(f"driver-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 4 and [w for w in won if w is not None] == [job_id]


def test_claim_skips_a_job_cancelled_while_queued(store: JobStore, redis_client: redis.Redis) -> None:
    first, second = store.create("alpha", SPEC).id, store.create("alpha", SPEC).id
    assert store.request_cancel(first) is JobStatus.cancelled
    # A cancel that lands after a driver popped the id but before it marked the job running leaves the id on
    # the queue side; put it back there to play that race out.
    redis_client.rpush(keys.queue(), first)
    assert store.claim("d", timeout=0) == second
    assert redis_client.lrange(keys.claimed(), 0, -1) == [second]
    assert store.get(first).status is JobStatus.cancelled


def test_cancel_a_queued_job_at_once(store: JobStore, redis_client: redis.Redis) -> None:
    job_id = store.create("alpha", SPEC).id
    assert store.request_cancel(job_id) is JobStatus.cancelled
    job = store.get(job_id)
    assert job.status is JobStatus.cancelled and job.finished_at
    assert redis_client.llen(keys.queue()) == 0
    assert store.cancel_requested(job_id)
    with pytest.raises(InvalidTransition, match="already cancelled"):
        store.request_cancel(job_id)


def test_cancel_a_running_job_sets_the_flag_the_driver_polls(store: JobStore, redis_client: redis.Redis) -> None:
    job_id = store.create("alpha", SPEC).id
    store.claim("d", timeout=0)
    assert not store.cancel_requested(job_id)
    assert store.request_cancel(job_id) is JobStatus.running
    assert store.get(job_id).status is JobStatus.running and store.cancel_requested(job_id)
    store.set_status(job_id, JobStatus.cancelled)
    assert store.get(job_id).status in TERMINAL
    assert redis_client.llen(keys.claimed()) == 0


def test_requeue_puts_a_running_job_back_first_in_line(store: JobStore) -> None:
    lost, waiting = store.create("alpha", SPEC).id, store.create("alpha", SPEC).id
    assert store.claim("lost-driver", timeout=0) == lost
    store.set_status(lost, JobStatus.queued)
    job = store.get(lost)
    assert job.status is JobStatus.queued and job.driver is None and job.started_at is None
    assert store.claim("new-driver", timeout=0) == lost
    assert store.claim("new-driver", timeout=0) == waiting


def test_idempotent_create_returns_the_first_job(store: JobStore, redis_server: EmbeddedRedis) -> None:
    made: list[str] = []

    def submit() -> None:
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        made.append(JobStore(client).create("alpha", SPEC, idempotency_key="retry-1").id)
        client.close()

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 1
    assert store.list("alpha")[1] == 1
    other = store.create("beta", SPEC, idempotency_key="retry-1")
    assert other.id != made[0] and other.tenant == "beta"


def test_tenants_see_only_their_jobs(store: JobStore) -> None:
    job_id = store.create("alpha", SPEC).id
    assert store.get(job_id, tenant="alpha").id == job_id
    with pytest.raises(JobNotFound, match=job_id):
        store.get(job_id, tenant="beta")
    assert store.list("beta") == ([], 0)


def test_list_pages_newest_first_and_filters_by_status(store: JobStore) -> None:
    ids = [store.create("alpha", SPEC).id for _ in range(5)]
    store.claim("d", timeout=0)
    store.claim("d", timeout=0)
    first_page, total = store.list("alpha", limit=2)
    second_page, _ = store.list("alpha", offset=2, limit=2)
    assert total == 5
    assert [j.id for j in first_page + second_page] == ids[::-1][:4]
    running, count = store.list("alpha", status="running")
    assert count == 2 and {j.id for j in running} == set(ids[:2])
    queued, count = store.list("alpha", status=JobStatus.queued)
    assert count == 3 and [j.id for j in queued] == ids[:1:-1]


def test_events_are_capped_and_read_after_an_id(store: JobStore, redis_client: redis.Redis) -> None:
    job_id = "e" * 16
    first = store.append_event(job_id, "tick", {"i": 0})
    later = [store.append_event(job_id, "tick", {"i": i}) for i in range(1, 1500)]
    length = redis_client.xlen(keys.events(job_id))
    assert 1000 <= length <= 1100  # MAXLEN ~ trims whole stream nodes
    kept = store.events(job_id, count=2000)
    assert kept[-1]["id"] == later[-1] and kept[-1]["data"] == {"i": 1499}
    assert kept[0]["id"] != first
    after = store.events(job_id, after=later[-3])
    assert [e["data"]["i"] for e in after] == [1498, 1499]
    assert after[0]["kind"] == "tick" and datetime.fromisoformat(after[0]["time"]).tzinfo == UTC


def test_checkpoint_round_trip(store: JobStore) -> None:
    job_id = store.create("alpha", SPEC).id
    assert store.load_checkpoint(job_id) is None
    state = {"evolutions": [{"parent": [1, 2, 3], "fitness": 0.25}], "rng": [7, None]}
    store.save_checkpoint(job_id, 3, state)
    assert store.load_checkpoint(job_id) == (3, state)
    store.save_checkpoint(job_id, 4, {"evolutions": []})
    assert store.load_checkpoint(job_id) == (4, {"evolutions": []})


def test_front_results_and_artifacts(store: JobStore) -> None:
    job_id = store.create("alpha", SPEC).id
    assert store.get_front(job_id) == {"objectives": [], "points": [], "updated_at": None, "generation": None}
    points = [
        {"candidate_id": "t0-g1-c0", "objectives": {"kl": 0.2, "params": 0.7}, "target": 0.3, "generation": 1},
        {"candidate_id": "t1-g2-c3", "objectives": {"kl": 0.5, "params": 0.5}, "target": 0.5, "generation": 2},
    ]
    store.set_front(job_id, points, objectives=methods.get("structured_prune").stored_objectives())
    front = store.get_front(job_id)
    assert front["points"] == points and front["generation"] == 2 and front["updated_at"]
    assert front["objectives"] == [{"name": "kl", "direction": "minimize", "unit": "nats"},
                                   {"name": "params", "direction": "minimize", "unit": "parameters"}]
    store.put_result(job_id, "t1-g2-c3", {"keep": {"0": 3}})
    assert store.get_result(job_id, "t1-g2-c3") == {"keep": {"0": 3}}
    assert store.result_ids(job_id) == ["t1-g2-c3"]
    with pytest.raises(CandidateNotFound, match="no candidate 'nope'"):
        store.get_result(job_id, "nope")
    meta = {"path": f"{job_id}/t1-g2-c3.tar.gz", "size": 10, "sha256": "ab" * 32}
    store.put_artifact(job_id, "t1-g2-c3", meta)
    assert store.get_artifact(job_id, "t1-g2-c3") == meta
    for bad in ("/etc/passwd", f"{job_id}/../other/x.tar.gz", "x.tar.gz"):
        with pytest.raises(ValueError, match="artifact path"):
            store.put_artifact(job_id, "c", {"path": bad})
    with pytest.raises(CandidateNotFound, match="no exported model"):
        store.get_artifact(job_id, "t0-g1-c0")


def test_a_new_store_on_the_same_redis_sees_everything(store: JobStore, redis_server: EmbeddedRedis) -> None:
    job_id = store.create("alpha", SPEC).id
    store.set_progress(job_id, {"generation": 2, "generations": 10, "evaluations": 17, "planned": 81})
    store.put_result(job_id, "c1", {"x": 1})
    fresh = JobStore(redis.Redis.from_url(redis_server.url, decode_responses=True))
    assert fresh.get(job_id).progress["evaluations"] == 17
    assert fresh.get_result(job_id, "c1") == {"x": 1}
    assert fresh.claim("d", timeout=0) == job_id


def test_jobs_survive_an_embedded_redis_restart(tmp_path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        job_id = JobStore(redis.Redis.from_url(server.url, decode_responses=True)).create("alpha", SPEC).id
    assert not server.running and (tmp_path / "redis").is_dir()
    with EmbeddedRedis(tmp_path) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        job = JobStore(client).get(job_id)
        assert job.status is JobStatus.queued and job.spec == SPEC
        assert json.loads(client.hget(keys.job(job_id), "spec")) == SPEC
        client.close()
