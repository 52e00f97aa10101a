"""A driver asked to stop (SIGTERM) puts its job back on the queue and exits; another driver finishes the job.

Store contract tests of `requeue_held`, the grace timer of an in-process `Driver` against real Redis, and an
integration test with a real driver process, SIGTERM mid-search and a second driver.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import over_http
import pytest
import redis

from darwinfront.core import keys
from darwinfront.core.errors import InvalidTransition
from darwinfront.core.settings import Settings
from darwinfront.core.status import JobStatus, check_transition
from darwinfront.core.store import JobStore, connect
from darwinfront.stack import EmbeddedStack
from service.embedded import EmbeddedRedis
from workers import tracking
from workers.driver import Driver
from workers.job import Cancelled, Job, LeaseLost, Stopping

pytest_plugins = ["service_fixtures"]

TINY = {"model": {"source": "builtin:tiny-llama"}}


def _held(store: JobStore, driver: str = "d1") -> str:
    job = store.create("alpha", TINY)
    assert store.claim(driver, timeout=0, lease_seconds=30) == job.id
    return job.id


def _requeued(store: JobStore, job_id: str) -> list[dict]:
    return [e["data"] for e in store.events(job_id) if e["kind"] == "requeued"]


def test_running_to_queued_is_the_one_way_back():
    check_transition(JobStatus.running, JobStatus.queued)
    with pytest.raises(InvalidTransition):
        check_transition(JobStatus.queued, JobStatus.queued)
    for final in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled):
        with pytest.raises(InvalidTransition, match="final"):
            check_transition(final, JobStatus.queued)


class _Idle(Job):
    def run(self) -> None:
        pass


def test_safe_points_say_lease_lost_then_cancel_then_stop(store: JobStore):
    job_id = _held(store)
    lost, stopping = threading.Event(), threading.Event()
    job = _Idle(store, job_id, lease_lost=lost, stopping=stopping)
    job.check_interrupts()  # nothing asked: carry on
    stopping.set()
    with pytest.raises(Stopping):
        job.check_interrupts()
    store.request_cancel(job_id)
    with pytest.raises(Cancelled):  # a cancelled job ends now rather than wait on the queue
        job.check_interrupts()
    lost.set()
    with pytest.raises(LeaseLost):
        _Idle(store, job_id, lease_lost=lost).check_interrupts()


def test_requeue_held_releases_the_lease_and_says_why(store: JobStore, redis_client: redis.Redis):
    job_id = _held(store)
    waiting = store.create("alpha", TINY).id
    store.save_checkpoint(job_id, 2, {"generation": 2})
    assert store.requeue_held(job_id, "d1", "driver stopping")
    job = store.get(job_id)
    assert job.status is JobStatus.queued and job.driver is None and job.started_at is None
    assert not redis_client.exists(keys.lease(job_id))
    assert redis_client.llen(keys.claimed()) == 0
    assert _requeued(store, job_id) == [{"driver": "d1", "reason": "driver stopping"}]
    assert [e["kind"] for e in store.events(job_id)][-2:] == ["requeued", "queued"]
    assert store.load_checkpoint(job_id) == (2, {"generation": 2})  # what it recorded stays
    assert store.claim("d2", timeout=0, lease_seconds=30) == job_id  # first in line, before `waiting`
    assert store.claim("d2", timeout=0, lease_seconds=30) == waiting


def test_requeue_held_leaves_a_job_that_is_not_ours(store: JobStore, redis_client: redis.Redis):
    job_id = _held(store, driver="d1")
    assert not store.requeue_held(job_id, "d2", "driver stopping")
    assert store.get(job_id).status is JobStatus.running and redis_client.get(keys.lease(job_id)) == "d1"
    store.set_status(job_id, JobStatus.succeeded)
    assert not store.requeue_held(job_id, "d1", "driver stopping")
    assert store.get(job_id).status is JobStatus.succeeded and _requeued(store, job_id) == []
    queued = store.create("alpha", TINY).id
    assert not store.requeue_held(queued, "d1", "driver stopping")
    assert redis_client.lrange(keys.queue(), 0, -1) == [queued]  # not pushed twice


def test_grace_period_over_requeues_the_stuck_job_and_exits(store: JobStore, redis_server: EmbeddedRedis, tmp_path):
    driver = Driver(redis_server.url, tmp_path, grace_seconds=0.3)
    exits: list[int] = []
    exited = threading.Event()
    driver._exit = lambda code: (exits.append(code), exited.set())
    job_id = store.create("alpha", TINY).id
    assert driver.store.claim(driver.driver_id, timeout=0, lease_seconds=30) == job_id
    driver.current_job = job_id  # a job busy far from any safe point (loading a model, say)
    started = time.monotonic()
    driver.terminate()
    driver.terminate()  # a second signal starts no second timer
    assert not exited.wait(0.15)  # the job still has its grace period
    assert exited.wait(5) and exits == [1]
    assert time.monotonic() - started >= 0.3
    assert store.get(job_id).status is JobStatus.queued
    assert _requeued(store, job_id) == [{"driver": driver.driver_id, "reason": "driver stopping: grace period over"}]


def test_grace_setting_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DARWINFRONT_SHUTDOWN_GRACE_SECONDS", raising=False)
    assert Settings().shutdown_grace_seconds == 20.0
    monkeypatch.setenv("DARWINFRONT_SHUTDOWN_GRACE_SECONDS", "3.5")
    assert Settings().shutdown_grace_seconds == 3.5


# ---- a real driver process ------------------------------------------------------------------------------------

SPEC = {
    "name": "stop",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "eval_tokens": 256, "seq_len": 64, "database_tokens": 512},
    "prune": {"targets": [0.3, 0.6], "criterion": "wanda_sp", "training_aware": False},
    "search": {"generations": 6, "offspring": 4},
    "seed": 11,
}
GRACE = 20.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory, micro_dir):
    # The default 30 s lease: a job queued again within seconds was released, not swept after a lapse.
    saved = {name: os.environ.pop(name, None) for name in ("DARWINFRONT_LEASE_SECONDS",)}
    os.environ["DARWINFRONT_SHUTDOWN_GRACE_SECONDS"] = str(GRACE)
    try:
        with EmbeddedStack(tmp_path_factory.mktemp("stop"), port=0) as running:
            yield running
    finally:
        os.environ.pop("DARWINFRONT_SHUTDOWN_GRACE_SECONDS")
        os.environ.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(scope="module")
def http(stack):
    with over_http.client(stack) as client:
        yield client


def _trials(stack, job_id) -> list[tuple[int, str, tuple]]:
    trials = tracking.open_study(stack.redis_url, job_id).get_trials(deepcopy=False)
    return [(t.number, t.user_attrs["candidate_id"], tuple(t.values or ())) for t in trials]


@pytest.mark.integration
def test_sigterm_requeues_the_job_and_another_driver_finishes_it(stack, http):
    job_id = http.post("/v1/jobs", json=SPEC).json()["id"]
    over_http.wait(http, job_id,
                   lambda j: (j.get("progress") or {}).get("generation", -1) >= 2 or over_http.finished(j))
    victim = stack.driver_process
    signalled = time.monotonic()
    os.kill(victim.pid, signal.SIGTERM)
    victim.wait(timeout=GRACE + 30)
    seconds = time.monotonic() - signalled
    print(f"driver exited {seconds:.2f} s after SIGTERM (code {victim.returncode})")
    assert seconds < GRACE and victim.returncode == 0  # stopped at a safe point, not by the grace timer

    store = JobStore(connect(stack.redis_url))
    job = store.get(job_id)
    assert job.status is JobStatus.queued and job.driver is None, job
    assert not store._r.exists(keys.lease(job_id)) and store._r.lrange(keys.queue(), 0, -1) == [job_id]
    requeued = [e["data"] for e in store.events(job_id) if e["kind"] == "requeued"]
    assert [r["reason"] for r in requeued] == ["driver stopping"]
    kept = _trials(stack, job_id)
    assert kept and store.load_checkpoint(job_id) is not None
    assert store.load_checkpoint(job_id)[0] < SPEC["search"]["generations"] - 1  # stopped mid-search

    stack.start_driver()
    job = over_http.wait(http, job_id, over_http.finished)
    assert job["status"] == "succeeded", job
    resumed = _trials(stack, job_id)
    assert resumed[: len(kept)] == kept  # the recorded trials were kept, and none was recorded again
    assert len({cid for _, cid, _ in resumed}) == len(resumed) == job["progress"]["evaluations"]

    clean = http.post("/v1/jobs", json=SPEC | {"name": "uninterrupted"}).json()["id"]
    assert over_http.wait(http, clean, over_http.finished)["status"] == "succeeded"
    got, expected = over_http.front(http, job_id), over_http.front(http, clean)
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected], abs=1e-9)
    assert len(resumed) == len(_trials(stack, clean))


@pytest.mark.integration
def test_a_job_far_from_a_safe_point_is_requeued_when_the_grace_period_ends(stack, http, monkeypatch):
    idle = stack.driver_process
    os.kill(idle.pid, signal.SIGTERM)
    assert idle.wait(timeout=GRACE + 30) == 0  # a driver with no job just exits

    monkeypatch.setenv("DARWINFRONT_SHUTDOWN_GRACE_SECONDS", "0.5")
    victim = stack.start_driver()
    job_id = http.post("/v1/jobs", json=SPEC | {"name": "grace", "seed": 12}).json()["id"]
    over_http.wait(http, job_id, lambda j: j["status"] != "queued")  # claimed: preparing, far from its first evaluation
    signalled = time.monotonic()
    os.kill(victim.pid, signal.SIGTERM)
    assert victim.wait(timeout=GRACE) == 1
    seconds = time.monotonic() - signalled
    print(f"driver exited {seconds:.2f} s after SIGTERM at the end of a 0.5 s grace period")
    store = JobStore(connect(stack.redis_url))
    assert store.get(job_id).status is JobStatus.queued and not store._r.exists(keys.lease(job_id))
    requeued = [e["data"]["reason"] for e in store.events(job_id) if e["kind"] == "requeued"]
    assert requeued == ["driver stopping: grace period over"]
