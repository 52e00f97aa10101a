"""Driver leases against a real Redis: renewals, lapses, the sweep that requeues, and the loser's signal."""

from __future__ import annotations

import time

import redis

from darwinfront.core import keys
from darwinfront.core.status import JobStatus
from darwinfront.core.store import JobStore

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


def _stranded(store: JobStore, redis_client: redis.Redis) -> str:
    """A job a claim moved to the claimed list and never marked running (the claimer died, or Redis went away)."""
    job = store.create("alpha", SPEC)
    assert redis_client.lmove(keys.queue(), keys.claimed(), "RIGHT", "LEFT") == job.id
    return job.id


def test_a_stray_claim_goes_back_to_the_queue_once_it_is_old(store: JobStore, redis_client: redis.Redis):
    job_id = _stranded(store, redis_client)
    assert store.requeue_expired(stray_seconds=60) == []  # first seen: a live claim may be finishing
    assert store.requeue_expired(stray_seconds=60) == []
    assert redis_client.lrange(keys.claimed(), 0, -1) == [job_id]
    assert store.claim("d1", timeout=0) is None  # stranded: nothing to claim
    assert store.requeue_expired(stray_seconds=0) == [job_id]
    assert redis_client.lrange(keys.claimed(), 0, -1) == [] and not redis_client.exists(keys.strays())
    assert store.claim("d1", timeout=0, lease_seconds=5) == job_id
    assert store.get(job_id).status is JobStatus.running
    assert store.requeue_expired(stray_seconds=0) == []  # running with a lease: no stray


def test_a_claim_that_finishes_is_no_stray(store: JobStore, redis_client: redis.Redis):
    job_id = _stranded(store, redis_client)
    assert store.requeue_expired(stray_seconds=0.2) == []
    store.set_status(job_id, JobStatus.running)  # the claimer's status write lands after all
    store.grant_lease(job_id, "d1", 5)
    time.sleep(0.3)
    assert store.requeue_expired(stray_seconds=0.2) == []
    assert store.get(job_id).status is JobStatus.running and not redis_client.exists(keys.strays())
    assert redis_client.lrange(keys.claimed(), 0, -1) == [job_id]


def test_a_cancelled_stray_leaves_the_claimed_list_without_requeueing(store: JobStore, redis_client: redis.Redis):
    job_id = _stranded(store, redis_client)
    assert store.request_cancel(job_id) is JobStatus.cancelled
    assert store.requeue_expired(stray_seconds=0) == []
    assert store.requeue_expired(stray_seconds=0) == []
    assert redis_client.lrange(keys.claimed(), 0, -1) == [] and redis_client.lrange(keys.queue(), 0, -1) == []
    assert store.get(job_id).status is JobStatus.cancelled
