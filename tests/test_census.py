"""The store's counts across tenants (`JobCensus`): what `/metrics` reports, against a real (embedded) Redis."""

from __future__ import annotations

from darwinfront.core.status import JobStatus
from darwinfront.core.store import JobStore

pytest_plugins = ["service_fixtures"]

SPEC = {"model": {"source": "builtin:tiny-llama"}, "prune": {"targets": [0.5]}}


def test_an_empty_store_counts_zero_in_every_status(store: JobStore) -> None:
    assert store.count_by_status() == dict.fromkeys(JobStatus, 0)
    assert store.queue_depth() == 0 and store.queued_ids() == [] and store.claimed_ids() == []


def test_counts_follow_jobs_of_every_tenant_through_their_statuses(store: JobStore) -> None:
    alpha = [store.create("alpha", SPEC).id for _ in range(3)]
    beta = store.create("beta", SPEC).id
    assert store.claim("d1", timeout=0) == alpha[0]
    store.set_status(alpha[0], JobStatus.succeeded)
    assert store.claim("d1", timeout=0) == alpha[1]
    store.request_cancel(beta)  # a queued job is cancelled at once and leaves the queue

    counts = store.count_by_status()
    assert counts[JobStatus.queued] == 1 and counts[JobStatus.running] == 1
    assert counts[JobStatus.succeeded] == 1 and counts[JobStatus.cancelled] == 1 and counts[JobStatus.failed] == 0
    assert store.queue_depth() == 1 and store.queued_ids() == [alpha[2]]
    assert store.claimed_ids() == [alpha[1]]  # the finished job left the claimed list


def test_queued_ids_list_the_next_job_last_and_claimed_ids_the_newest_first(store: JobStore) -> None:
    ids = [store.create("alpha", SPEC).id for _ in range(4)]
    assert store.queued_ids() == ids[::-1]  # the oldest is taken next
    first, second = store.claim("d1", timeout=0), store.claim("d2", timeout=0)
    assert (first, second) == (ids[0], ids[1])
    assert store.claimed_ids() == [second, first]
    assert store.queue_depth() == 2 and store.queued_ids() == [ids[3], ids[2]]
