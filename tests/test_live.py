"""Live updates: ETag / If-None-Match on the job and its front, the server-sent event stream, `darwinfront watch`.

The stream tests run the real server (uvicorn, embedded Redis, no driver); the test plays the driver's part
through the job store, writing what a driver writes after each generation.
"""

from __future__ import annotations

import io
import queue
import threading
import time

import pytest
import redis

from darwinfront.cli import main
from darwinfront.client import Client
from darwinfront.core import methods
from darwinfront.core.store import JobStore
from darwinfront.stack import EmbeddedStack
from darwinfront.watch import watch
from service.etag import matches

pytest_plugins = ["service_fixtures"]

SPEC = {"model": {"source": "builtin:micro-llama"}, "prune": {"targets": [0.5]}}


def _point(cid: str, kl: float, params: int, generation: int) -> dict:
    return {"candidate_id": cid, "objectives": {"kl": kl, "params": params}, "target": 0.5, "generation": generation}


def _generation(store: JobStore, job_id: str, generation: int, points: list[dict]) -> None:
    """What the driver writes at the end of a generation: front, progress, then the `generation` event."""
    objectives = methods.get("structured_prune").stored_objectives()
    store.set_front(job_id, points, generation=generation, objectives=objectives)
    store.set_progress(job_id, {"generation": generation, "generations": 2, "evaluations": 4 * (generation + 1),
                                "planned": 12, "best": {"0.5": points[-1]["objectives"]["kl"]}})
    store.append_event(job_id, "generation", {"generation": generation, "front_size": len(points)})


# ---- ETag -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, False), ('"abc"', True), ('W/"abc"', True), ('"x", "abc"', True), ("*", True), ('"abd"', False)],
)
def test_if_none_match_parsing(header, expected):
    assert matches(header, '"abc"') is expected


def test_job_is_304_until_its_progress_changes(api_client, store):
    job_id = api_client.post("/v1/jobs", json=SPEC).json()["id"]
    first = api_client.get(f"/v1/jobs/{job_id}")
    tag = first.headers["ETag"]
    assert first.status_code == 200 and first.headers["Cache-Control"] == "private, no-cache"

    again = api_client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b"" and again.headers["ETag"] == tag

    store.set_progress(job_id, {"generation": 0, "evaluations": 3})
    changed = api_client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag
    assert changed.json()["progress"] == {"generation": 0, "evaluations": 3}


def test_front_is_304_until_a_new_snapshot(api_client, store):
    job_id = api_client.post("/v1/jobs", json=SPEC).json()["id"]
    empty = api_client.get(f"/v1/jobs/{job_id}/front")
    assert empty.json()["points"] == []
    unchanged = api_client.get(f"/v1/jobs/{job_id}/front", headers={"If-None-Match": empty.headers["ETag"]})
    assert unchanged.status_code == 304

    store.set_front(job_id, [_point("c1", 0.2, 500, 0)], objectives=methods.get("structured_prune").stored_objectives())
    fresh = api_client.get(f"/v1/jobs/{job_id}/front", headers={"If-None-Match": empty.headers["ETag"]})
    assert fresh.status_code == 200 and [p["candidate_id"] for p in fresh.json()["points"]] == ["c1"]


def test_the_tag_of_another_tenant_does_not_reveal_the_job(api_client, other_headers):
    job_id = api_client.post("/v1/jobs", json=SPEC).json()["id"]
    tag = api_client.get(f"/v1/jobs/{job_id}").headers["ETag"]
    headers = other_headers | {"If-None-Match": tag}
    assert api_client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 404


# ---- the stream ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The real server on an embedded Redis, without a driver: (stack, store)."""
    with EmbeddedStack(tmp_path_factory.mktemp("live"), port=0, driver=False) as stack:
        client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        yield stack, JobStore(client)
        client.close()


def _read_stream(client: Client, job_id: str, into: queue.Queue, after: str = "0-0") -> threading.Thread:
    def run() -> None:
        for message in client.stream(job_id, after=after):
            into.put(message)
        into.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _next(messages: queue.Queue, event: str, timeout: float = 10.0, seen: list | None = None):
    """The next `event` message; the ones skipped on the way are appended to `seen`."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = messages.get(timeout=left)
        assert message is not None, f"the stream ended before a {event!r} message"
        if message.event == event:
            return message
        if seen is not None:
            seen.append(message)
    raise AssertionError(f"no {event!r} message in {timeout} s")


def test_a_generation_event_arrives_while_following(live):
    stack, store = live
    with Client(stack.url, stack.key) as client:
        job = client.submit(SPEC)
        messages: queue.Queue = queue.Queue()
        reader = _read_stream(client, job.id, messages)
        assert _next(messages, "queued").data.kind == "queued"
        assert _next(messages, "job").data.status == "queued"  # connected and caught up

        seen: list = []
        store.claim("test-driver", timeout=0)
        _generation(store, job.id, 0, [_point("g0-a", 0.4, 600, 0)])
        generation = _next(messages, "generation", seen=seen)
        assert generation.data.data == {"generation": 0, "front_size": 1} and generation.id

        # The state is sent right after the event (or before it, when the stream woke mid-write).
        store.set_status(job.id, "succeeded")
        end = _next(messages, "end", seen=seen)
        fronts = [m.data for m in seen if m.event == "front"]
        assert [p.candidate_id for p in fronts[-1].points] == ["g0-a"]
        jobs = [m.data for m in seen if m.event == "job"]
        assert jobs[-1].status == "succeeded" and jobs[-1].progress["evaluations"] == 4
        assert end.data["status"] == "succeeded"
        reader.join(5)
        assert messages.get(timeout=1) is None and not reader.is_alive()  # the stream closed after `end`


def test_stream_resumes_after_a_known_event(live):
    stack, store = live
    with Client(stack.url, stack.key) as client:
        job = client.submit(SPEC)
        store.claim("test-driver", timeout=0)
        _generation(store, job.id, 0, [_point("a", 0.4, 600, 0)])
        first_id = client.events(job.id)[0].id
        store.set_status(job.id, "cancelled")
        kinds = [m.event for m in client.stream(job.id, after=first_id)]
    assert kinds[0] == "running" and "queued" not in kinds  # nothing before the resume point
    assert kinds[-1] == "end" and {"generation", "job", "front", "cancelled"} <= set(kinds)


class _Screen(io.StringIO):
    """Output of `watch` that lets the test wait for a line to be shown."""

    def __init__(self):
        super().__init__()
        self.changed = threading.Condition()

    def write(self, text: str) -> int:
        with self.changed:
            written = super().write(text)
            self.changed.notify_all()
        return written

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: text in self.getvalue(), timeout), self.getvalue()


def test_watch_reprints_the_front_as_it_changes(live):
    stack, store = live
    screen = _Screen()
    with Client(stack.url, stack.key) as client:
        job = client.submit(SPEC)
        store.claim("test-driver", timeout=0)
        _generation(store, job.id, 0, [_point("first-point", 0.4, 600, 0)])

        def drive() -> None:
            screen.wait_for("front after generation 0")  # watch is following: change the front under it
            _generation(store, job.id, 1, [_point("second-point", 0.3, 400, 1), _point("first-point", 0.4, 600, 0)])
            screen.wait_for("front after generation 1")
            store.set_status(job.id, "succeeded")

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        final = watch(client, job.id, out=screen, bar=False)
        driver.join(5)
    assert final.status == "succeeded"
    text = screen.getvalue()
    first, second = text.index("front after generation 0"), text.index("front after generation 1")
    assert "second-point" not in text[first:second] and "second-point" in text[second:]
    assert text[second:].index("second-point") < text[second:].index("first-point")  # smallest model first


def test_cli_watch_exit_code_follows_the_job(live, capsys):
    stack, store = live
    while store.claim("test-driver", timeout=0):  # what earlier tests left queued
        pass
    with Client(stack.url, stack.key) as client:
        done = client.submit(SPEC)
        failed = client.submit(SPEC)
    for job_id, status in ((done.id, "succeeded"), (failed.id, "failed")):
        assert store.claim("test-driver", timeout=0) == job_id
        _generation(store, job_id, 0, [_point(f"{status}-c", 0.4, 600, 0)])
        store.set_status(job_id, status, error="boom" if status == "failed" else None)
    assert main(["--url", stack.url, "--key", stack.key, "watch", done.id]) == 0
    out = capsys.readouterr().out
    assert "succeeded-c" in out and out.strip().endswith(f"{done.id} succeeded")
    assert main(["--url", stack.url, "--key", stack.key, "watch", failed.id]) == 1
    assert capsys.readouterr().out.strip().endswith(f"{failed.id} failed: boom")
