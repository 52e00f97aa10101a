"""Driver leases against a real Redis: renewals, lapses, the sweep that requeues, and the loser's signal."""

from __future__ import annotations

import time

import redis

from service import keys
from service.status import JobStatus
from service.store import JobStore

pytest_plugins = ["service_fixtures"]

SPEC = {"model": {"source": "builtin:tiny-llama"}}


def _claimed(store: JobStore, driver: str = "d1", seconds: float = 0.3) -> str:
    job = store.create("alpha", SPEC)
    assert store.claim(driver, timeout=0, lease_seconds=seconds) == job.id
    return job.id


def test_claim_grants_a_lease_that_blocks_the_sweep(store: JobStore, redis_client: redis.Redis):
    job_id = _claimed(store, seconds=5)
    assert redis_client.get(keys.lease(job_id)) == "d1"
    assert store.requeue_expired() == []
    assert store.get(job_id).status is JobStatus.running


def test_lapsed_lease_is_requeued_and_claimed_again(store: JobStore):
    job_id = _claimed(store, seconds=0.2)
    time.sleep(0.35)
    assert store.requeue_expired() == [job_id]
    record = store.get(job_id)
    assert record.status is JobStatus.queued and record.driver is None
    assert store.claim("d2", timeout=0, lease_seconds=5) == job_id
    assert store.get(job_id).driver == "d2"
    kinds = [e["kind"] for e in store.events(job_id)]
    assert kinds == ["queued", "running", "queued", "running"]


def test_renewal_keeps_the_job_and_a_loser_learns_it_lost(store: JobStore):
    job_id = _claimed(store, seconds=0.3)
    for _ in range(4):
        time.sleep(0.15)
        assert store.renew_lease(job_id, "d1", 0.3)
    assert store.requeue_expired() == []
    time.sleep(0.4)
    store.requeue_expired()
    store.claim("d2", timeout=0, lease_seconds=5)
    assert not store.renew_lease(job_id, "d1", 0.3)  # d2 holds it now
    assert store.renew_lease(job_id, "d2", 5)


def test_a_paused_driver_retakes_its_lapsed_lease_if_nobody_swept(store: JobStore):
    job_id = _claimed(store, seconds=0.1)
    time.sleep(0.2)
    assert store.renew_lease(job_id, "d1", 5)
    assert store.requeue_expired() == []


def test_terminal_status_drops_the_lease(store: JobStore, redis_client: redis.Redis):
    job_id = _claimed(store, seconds=5)
    store.set_status(job_id, JobStatus.succeeded)
    assert not redis_client.exists(keys.lease(job_id))
    assert not store.renew_lease(job_id, "d1", 5)
