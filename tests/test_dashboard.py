"""The dashboard page and its assets; then, on a real job: metrics, history, client, Optuna study, and the page
driven in headless Chromium.

One small real job (builtin:micro-llama, two targets, three generations) runs on the embedded stack; while it
runs, the typed client waits with a progress callback and `/metrics` is scraped. The page is then opened in
headless Chromium with the key in the address fragment; the test asserts one plot marker per front point,
hovers a point, clicks it to download its configuration, and saves a screenshot (into the test's folder, and
into $DARWINFRONT_SCREENSHOTS when set).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import httpx
import pytest
from browser import Browser, chromium_binary
from prometheus_client.parser import text_string_to_metric_families

from darwinfront.client import Client
from darwinfront.stack import EmbeddedStack
from service.history import front_hypervolume, job_storage
from service.routes.dashboard import CONTENT_SECURITY_POLICY

pytest_plugins = ["service_fixtures"]

SPEC = {
    "name": "dashboard",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 1024, "eval_tokens": 512, "seq_len": 64},
    "prune": {"targets": [0.25, 0.5], "criterion": "wanda_sp", "training_aware": False, "levels": 16},
    "search": {"generations": 3, "offspring": 4},
    "seed": 3,
}


def _job_evaluations(url: str, job_id: str) -> float | None:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "darwinfront_job_evaluations_total" and sample.labels.get("job_id") == job_id:
                return sample.value
    return None


def test_page_and_assets_are_served_without_a_key(api_client):
    anonymous = {"Authorization": ""}
    root = api_client.get("/", headers=anonymous, follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/dashboard"
    page = api_client.get("/dashboard", headers=anonymous)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    for asset in ("/static/dashboard/plot.js", "/static/dashboard/app.js", "/static/dashboard/style.css"):
        assert asset in page.text  # referenced by the page, and shipped with it
        assert api_client.get(asset, headers=anonymous).status_code == 200
    assert "http" not in page.text.replace("http://127.0.0.1", "")  # nothing from another origin
    assert api_client.get("/v1/jobs", headers=anonymous).status_code == 401  # the data still needs a key


@pytest.fixture(scope="module")
def per_job_metrics():
    """`/metrics` with the per-job series (off by default), so the test can watch the job's counter."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DARWINFRONT_METRICS_PER_JOB", "true")
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_dir, per_job_metrics):
    """The stack, a client, and the finished job with what was seen while it ran."""
    with EmbeddedStack(tmp_path_factory.mktemp("dashboard"), port=0) as stack, Client(stack.url, stack.key) as client:
        job = client.submit(SPEC)
        seen, scraped = [], []

        def on_progress(current) -> None:
            seen.append(current)
            if current.status == "running":
                scraped.append(_job_evaluations(stack.url, job.id))

        final = client.wait(job.id, timeout=900, poll=0.3, on_progress=on_progress)
        assert final.status == "succeeded", final.error
        yield stack, client, final, seen, scraped


@pytest.mark.integration
def test_client_waits_with_progress_and_metrics_move(run):
    stack, client, job, seen, scraped = run
    statuses = [j.status for j in seen]
    assert statuses[-1] == "succeeded" and "running" in statuses
    evaluations = [j.progress.get("evaluations", 0) for j in seen]
    assert evaluations == sorted(evaluations) and len(set(evaluations)) >= 2  # progress arrived in steps
    counts = [c for c in scraped if c is not None]
    assert len(set(counts)) >= 2 and counts == sorted(counts)  # the per-job counter moved during the job
    assert client.not_modified > 0  # polling an unchanged job got 304s
    after = {s.labels.get("status"): s.value
             for f in text_string_to_metric_families(httpx.get(f"{stack.url}/metrics").text)
             for s in f.samples if s.name == "darwinfront_jobs"}
    assert after["succeeded"] >= 1 and after["running"] == 0


@pytest.mark.integration
def test_history_hypervolume_grows_to_the_fronts(run):
    _, client, job, _, _ = run
    history = client.history(job.id)
    assert [p.generation for p in history.points] == list(range(SPEC["search"]["generations"] + 1))
    volumes = [p.hypervolume for p in history.points]
    assert all(v is not None for v in volumes) and volumes == sorted(volumes) and 0 < volumes[-1] < 1
    front = client.front(job.id)
    # the front is the non-dominated set of all candidates, so it has the same hypervolume as all of them
    assert volumes[-1] == pytest.approx(front_hypervolume(front.model_dump(), {"parameters": history.dense_params}))
    assert set(history.points[-1].best) == {str(t) for t in SPEC["prune"]["targets"]}


@pytest.mark.integration
def test_optuna_dashboard_opens_the_jobs_study(run):
    stack, _, job, _, _ = run
    import optuna
    from optuna_dashboard import wsgi

    storage = job_storage(stack.redis_url, job.id)
    app = wsgi(storage)
    status, environ = [], {"PATH_INFO": "/api/studies"}
    setup_testing_defaults(environ)
    body = b"".join(app(environ, lambda line, headers, exc_info=None: status.append(line)))
    studies = json.loads(body)["study_summaries"]
    assert status[0].startswith("200") and [s["study_name"] for s in studies] == [f"darwinfront-{job.id}"]
    trials = optuna.load_study(study_name=None, storage=storage).get_trials(deepcopy=False)
    assert len(trials) == job.progress["evaluations"]
    assert all({"candidate_id", "genome", "target"} <= set(t.user_attrs) for t in trials)


def _require_chromium() -> None:
    if chromium_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")


@pytest.mark.integration
def test_dashboard_page_shows_the_front(run, tmp_path):
    _require_chromium()
    stack, client, job, _, _ = run
    front, history = client.front(job.id), client.history(job.id)
    page = httpx.get(f"{stack.url}/dashboard")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with Browser(tmp_path / "profile") as browser:
        browser.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
        browser.call("Page.navigate", url=f"{stack.url}/dashboard#job={job.id}&key={stack.key}")
        browser.wait_for("document.getElementById('job').dataset.stream === 'ended'")
        markers = browser.wait_for(
            f"document.querySelectorAll('#front-plot .front-point').length === {len(front.points)}"
            " && document.querySelectorAll('#hv-plot .hv-point').length")
        assert markers == len(history.points)
        assert browser.evaluate("location.hash") == f"#job={job.id}"  # the key left the address
        assert browser.evaluate("sessionStorage.getItem('darwinfront.key')") == stack.key
        assert browser.evaluate("document.querySelectorAll('#front-table tbody tr').length") == len(front.points)
        assert browser.evaluate("document.getElementById('job-status').textContent") == "succeeded"
        assert browser.evaluate("document.querySelectorAll('#event-table tbody tr').length") >= len(history.points)

        # hover the smallest model's marker: its configuration summary shows; clicking downloads it
        smallest = min(front.points, key=lambda p: p.objectives["params"])
        x, y = browser.evaluate(
            f"(() => {{ const dot = document.querySelector("
            f"'#front-plot .front-point[data-id=\"{smallest.candidate_id}\"]');"
            " dot.scrollIntoView({block: 'center'}); const box = dot.getBoundingClientRect();"
            " return [box.x + box.width / 2, box.y + box.height / 2]; })()"
        )
        browser.mouse("mouseMoved", x, y)
        tip = browser.wait_for("(t => !t.hidden && t.textContent.includes('attention units') && t.textContent)"
                               "(document.getElementById('tooltip'))")
        assert smallest.candidate_id in tip and "MLP channels" in tip
        shot = browser.screenshot(tmp_path / "dashboard.png")
        browser.click(x, y)
        name = f"{job.id}-{smallest.candidate_id}.json"
        deadline = time.monotonic() + 20
        while not (downloads / name).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert json.loads((downloads / name).read_text()) == client.configuration(job.id, smallest.candidate_id)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if folder := os.environ.get("DARWINFRONT_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(folder) / "dashboard.png")


@pytest.mark.integration
def test_front_plot_from_the_cli(run, tmp_path, capsys):
    from darwinfront.cli import main

    stack, client, job, _, _ = run
    path = tmp_path / "front.png"
    assert main(["--url", stack.url, "--key", stack.key, "front", job.id, "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(p.candidate_id in out for p in client.front(job.id).points) and str(path) in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
