"""Helpers for tests that drive a running embedded stack over HTTP: wait for a job, read its front."""

from __future__ import annotations

import time

import httpx


def client(stack) -> httpx.Client:
    """An HTTP client for `stack` (an `EmbeddedStack`), with its API key."""
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30)


def wait(http: httpx.Client, job_id: str, until, timeout: float = 600.0, poll: float = 0.2) -> dict:
    """Poll the job until `until(job)` holds; its last state. AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(poll)
    raise AssertionError(f"job {job_id} never got there: {job}")


def finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def front(http: httpx.Client, job_id: str) -> list[tuple[str, float, float]]:
    """The front as (candidate id, params, KL), in the order the API gives."""
    return [(p["candidate_id"], p["objectives"]["params"], p["objectives"]["kl"])
            for p in http.get(f"/v1/jobs/{job_id}/front").json()["points"]]
