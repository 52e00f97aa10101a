"""Faults a real cluster has: a driver killed with SIGKILL mid-job resumes to the front of an uninterrupted run."""

from __future__ import annotations

import os
import signal

import over_http
import pytest

from darwinfront.stack import EmbeddedStack
from workers import tracking

pytestmark = pytest.mark.integration

SPEC = {
    "name": "recovery",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "eval_tokens": 256, "seq_len": 64, "database_tokens": 512},
    "prune": {"targets": [0.3, 0.6], "criterion": "wanda_sp", "training_aware": False},
    "search": {"generations": 6, "offspring": 4},
    "seed": 5,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, micro_dir):
    previous = os.environ.get("DARWINFRONT_LEASE_SECONDS")
    os.environ["DARWINFRONT_LEASE_SECONDS"] = "3"
    try:
        with EmbeddedStack(tmp_path_factory.mktemp("recovery"), port=0) as running:
            yield running
    finally:
        if previous is None:
            os.environ.pop("DARWINFRONT_LEASE_SECONDS", None)
        else:
            os.environ["DARWINFRONT_LEASE_SECONDS"] = previous


@pytest.fixture(scope="module")
def http(stack):
    with over_http.client(stack) as client:
        yield client


def test_sigkilled_driver_resumes_to_the_uninterrupted_front(stack, http):
    interrupted = http.post("/v1/jobs", json=SPEC).json()["id"]
    over_http.wait(http, interrupted, lambda j: (j.get("progress") or {}).get("generation", -1) >= 2)
    victim = stack.driver_process
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert http.get(f"/v1/jobs/{interrupted}").json()["status"] == "running"

    stack.start_driver()
    job = over_http.wait(http, interrupted, over_http.finished)
    assert job["status"] == "succeeded", job
    kinds = [e["kind"] for e in http.get(f"/v1/jobs/{interrupted}/events").json()["events"]]
    assert kinds.count("running") == 2 and "queued" in kinds[2:]  # requeued once, claimed again

    clean = http.post("/v1/jobs", json=SPEC | {"name": "uninterrupted"}).json()["id"]
    assert over_http.wait(http, clean, over_http.finished)["status"] == "succeeded"

    got, expected = over_http.front(http, interrupted), over_http.front(http, clean)
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected], abs=1e-9)

    trials = {
        name: tracking.open_study(stack.redis_url, job_id).get_trials(deepcopy=False)
        for name, job_id in (("interrupted", interrupted), ("clean", clean))
    }
    ids = [t.user_attrs["candidate_id"] for t in trials["interrupted"]]
    assert len(ids) == len(set(ids)), "a candidate was recorded twice"
    assert len(trials["interrupted"]) == len(trials["clean"])
    assert job["progress"]["evaluations"] == len(trials["clean"])


def test_redis_restart_mid_job_and_the_job_still_succeeds(stack, http):
    if stack.redis is None:
        pytest.skip("an external Redis is in use")
    spec = SPEC | {"name": "redis restart", "seed": 6}
    job_id = http.post("/v1/jobs", json=spec).json()["id"]
    over_http.wait(http, job_id, lambda j: (j.get("progress") or {}).get("generation", -1) >= 1)
    stack.redis.restart(down_seconds=2.0)
    job = over_http.wait(http, job_id, over_http.finished)
    assert job["status"] == "succeeded", job
    assert len(http.get(f"/v1/jobs/{job_id}/front").json()["points"]) >= 2
    trials = tracking.open_study(stack.redis_url, job_id).get_trials(deepcopy=False)
    ids = [t.user_attrs["candidate_id"] for t in trials]
    assert len(ids) == len(set(ids)) == job["progress"]["evaluations"]
