"""The SSE stream's wait for a job's next event (`EventWaiter`), against a real (embedded) Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from darwinfront.core.event_wait import SOCKET_TIMEOUT_SECONDS, EventWaiter
from darwinfront.core.store import JobStore

pytest_plugins = ["service_fixtures"]

SPEC = {"model": {"source": "builtin:tiny-llama"}, "prune": {"targets": [0.5]}}


async def _wait(url: str, job_id: str, after: str, timeout: float, *, append=None) -> tuple[bool, float]:
    """(woke, seconds) of one wait; `append`, when given, runs in a thread 0.2 s into the wait."""
    waiter = EventWaiter.connect(url)
    try:
        start = time.monotonic()
        pending = asyncio.create_task(waiter.wait(job_id, after=after, timeout=timeout))
        if append is not None:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(append)
        woke = await pending
        return woke, time.monotonic() - start
    finally:
        await waiter.aclose()


def test_an_event_already_there_answers_at_once(store: JobStore, redis_server) -> None:
    job_id = store.create("alpha", SPEC).id  # creation appends the `queued` event
    woke, seconds = asyncio.run(_wait(redis_server.url, job_id, "0-0", timeout=5.0))
    assert woke and seconds < 2.0


def test_a_new_event_wakes_the_wait(store: JobStore, redis_server) -> None:
    job_id = store.create("alpha", SPEC).id
    last = store.events(job_id)[-1]["id"]

    def append() -> None:
        store.append_event(job_id, "generation", {"generation": 0})

    woke, seconds = asyncio.run(_wait(redis_server.url, job_id, last, timeout=5.0, append=append))
    assert woke and seconds < 4.0


def test_no_new_event_times_out(store: JobStore, redis_server) -> None:
    job_id = store.create("alpha", SPEC).id
    last = store.events(job_id)[-1]["id"]
    woke, seconds = asyncio.run(_wait(redis_server.url, job_id, last, timeout=0.3))
    assert not woke and seconds >= 0.25


@pytest.mark.parametrize("timeout", [0, -1, SOCKET_TIMEOUT_SECONDS])
def test_a_wait_the_socket_cannot_hold_is_refused(redis_server, timeout) -> None:
    with pytest.raises(ValueError, match="timeout must lie in"):
        asyncio.run(_wait(redis_server.url, "j", "0-0", timeout=timeout))
