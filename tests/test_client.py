"""The typed client against the embedded stack (real server and Redis, no driver: the test writes what a
driver writes), and the front plot."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from darwinfront.client import ApiError, Client, parse_sse
from darwinfront.core import methods
from darwinfront.core.errors import DarwinfrontError
from darwinfront.core.store import JobStore
from darwinfront.stack import EmbeddedStack
from service.schemas import Event, Front, FrontPoint, History, JobList, JobPublic

SPEC = {"model": {"source": "builtin:micro-llama"}, "prune": {"targets": [0.5]}, "search": {"generations": 2}}
PRUNE_OBJECTIVES = methods.get("structured_prune").stored_objectives()
POINTS = [
    {"candidate_id": "small", "objectives": {"kl": 0.9, "params": 400}, "target": 0.5, "generation": 1},
    {"candidate_id": "big", "objectives": {"kl": 0.2, "params": 800}, "target": 0.25, "generation": 0,
     "held_out_kl": 0.25},
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with EmbeddedStack(tmp_path_factory.mktemp("client"), port=0, driver=False) as running:
        yield running


@pytest.fixture
def store(stack):
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    yield JobStore(client)
    client.close()


@pytest.fixture
def client(stack):
    with Client(stack.url, stack.key) as c:
        yield c


def _claim(store: JobStore, job_id: str) -> None:
    while (claimed := store.claim("test-driver", timeout=0)) not in (job_id, None):
        pass  # an earlier test's job
    assert claimed == job_id


def test_submit_job_jobs_return_schema_models(client):
    job = client.submit(SPEC, idempotency_key="client-test-1")
    assert isinstance(job, JobPublic) and job.status == "queued" and job.spec["search"]["generations"] == 2
    assert client.submit(SPEC, idempotency_key="client-test-1").id == job.id
    assert isinstance(client.job(job.id), JobPublic)
    listing = client.jobs(status="queued")
    assert isinstance(listing, JobList) and job.id in [j.id for j in listing.items]
    events = client.events(job.id)
    assert all(isinstance(e, Event) for e in events) and events[0].kind == "queued"
    assert client.cancel(job.id).status == "cancelled"


def test_job_and_front_revalidate_with_etags(client, store):
    job = client.submit(SPEC)
    first = client.job(job.id)
    before = client.not_modified
    assert client.job(job.id) is first and client.not_modified == before + 1  # 304: the copy we hold
    store.set_progress(job.id, {"generation": 0, "evaluations": 2})
    changed = client.job(job.id)
    assert changed is not first and changed.progress["evaluations"] == 2

    assert client.front(job.id).points == []
    store.set_front(job.id, POINTS, objectives=PRUNE_OBJECTIVES)
    front = client.front(job.id)
    assert isinstance(front, Front) and [p.candidate_id for p in front.points] == ["small", "big"]
    assert front.points[1].held_out_kl == 0.25  # extra point fields come through
    assert client.front(job.id) is front


def test_errors_carry_the_servers_code(client):
    with pytest.raises(ApiError) as missing:
        client.job("0123456789abcdef")
    assert missing.value.status == 404 and missing.value.code == "job_not_found"
    with pytest.raises(ApiError) as bad:
        client.submit({"model": {"source": "builtin:micro-llama"}, "prune": {"targets": [1.5]}})
    assert bad.value.status == 422 and bad.value.field == "prune.targets.0"


def test_wait_calls_back_on_every_change_until_final(client, store):
    job = client.submit(SPEC)

    def drive() -> None:
        time.sleep(0.3)
        _claim(store, job.id)
        for generation in range(3):
            time.sleep(0.3)
            store.set_progress(job.id, {"generation": generation, "evaluations": 4 * (generation + 1), "planned": 12})
        time.sleep(0.3)
        store.set_status(job.id, "succeeded")

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    seen: list[JobPublic] = []
    final = client.wait(job.id, poll=0.05, timeout=30, on_progress=seen.append)
    driver.join(5)
    assert final.status == "succeeded" and seen[0].status == "queued" and seen[-1] is final
    states = [(j.status, j.progress.get("evaluations", 0)) for j in seen]
    assert all(a != b for a, b in zip(states, states[1:], strict=False))  # each change once: no repeats
    assert states == sorted(states, key=lambda s: (["queued", "running", "succeeded"].index(s[0]), s[1]))
    assert ("running", 12) in states or ("succeeded", 12) in states
    assert client.not_modified > 0  # unchanged polls were 304s


def test_wait_times_out_with_a_clear_error(client):
    job = client.submit(SPEC)
    with pytest.raises(DarwinfrontError, match="still queued after 0.2 s"):
        client.wait(job.id, poll=0.05, timeout=0.2)


def test_history_configuration_and_download(client, store, tmp_path):
    job = client.submit(SPEC)
    _claim(store, job.id)
    store.append_event(job.id, "prepared", {"dense": {"params": 1000}})
    store.append_event(job.id, "generation", {"generation": 0, "best": {"0.5": 0.3}, "front_size": 2})
    history = client.history(job.id)
    assert isinstance(history, History) and history.dense_params == 1000
    assert [(p.generation, p.best, p.front_size) for p in history.points] == [(0, {"0.5": 0.3}, 2)]
    configuration = {"candidate_id": "small", "layers": [], "parameters": 400}
    store.put_result(job.id, "small", configuration)
    assert client.configuration(job.id, "small") == configuration
    path = client.download_configuration(job.id, "small", tmp_path / "small.json")
    assert path.read_text().startswith("{") and client.configuration(job.id, "small") == configuration
    with pytest.raises(ApiError, match="no exported model"):
        client.download_model(job.id, "small", tmp_path / "small.tar.gz")


def test_unreachable_server_is_a_darwinfront_error():
    with Client("http://127.0.0.1:9", "key") as client, pytest.raises(DarwinfrontError, match="cannot reach"):
        client.job("x")


def test_parse_sse_reads_events_ids_and_multiline_data():
    lines = [": comment", "id: 5-0", "event: generation",
             'data: {"id": "5-0", "time": "2026-01-01T00:00:00Z",', 'data: "kind": "generation", "data": {}}', "",
             "event: end", 'data: {"status": "succeeded"}', ""]
    messages = list(parse_sse(iter(lines)))
    assert [(m.event, m.id) for m in messages] == [("generation", "5-0"), ("end", None)]
    assert isinstance(messages[0].data, Event) and messages[1].data == {"status": "succeeded"}


def test_front_figure_plots_every_point():
    from darwinfront.plot import front_figure

    front = Front(job_id="j", objectives=PRUNE_OBJECTIVES, points=[FrontPoint(**p) for p in POINTS], updated_at=None,
                  generation=None)
    figure = front_figure(front, dense_params=1000)
    plotted = {tuple(xy) for c in figure.axes[0].collections for xy in c.get_offsets().tolist()}
    assert plotted == {(400.0, 0.9), (800.0, 0.2)}
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["target 0.5", "target 0.25"]
    assert "2 points (final)" in figure.axes[0].get_title()


def test_front_figure_draws_the_objectives_the_front_declares():
    from darwinfront.plot import front_figure

    points = [FrontPoint(candidate_id="kv-0", objectives={"kl": 0.01, "bits": 2.0}),
              FrontPoint(candidate_id="kv-1", objectives={"kl": 0.001, "bits": 4.0})]
    front = Front(job_id="j", objectives=methods.get("kv_precision").stored_objectives(), points=points,
                  updated_at=None, generation=None)
    ax = front_figure(front, dense_params=1000).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("bits (bits/element)", "kl (nats)")
    assert {tuple(xy) for c in ax.collections for xy in c.get_offsets().tolist()} == {(2.0, 0.01), (4.0, 0.001)}
    assert ax.child_axes == []  # a fraction of the dense model is drawn for parameters only


def test_plot_front_writes_the_format_of_the_suffix(tmp_path):
    from darwinfront.plot import plot_front

    front = Front(job_id="j", objectives=PRUNE_OBJECTIVES, points=[FrontPoint(**p) for p in POINTS], updated_at=None,
                  generation=3)
    assert plot_front(front, tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in plot_front(front, tmp_path / "f.svg").read_bytes()[:400]
