"""lm-eval scores end to end over real HTTP: a prune job runs, two of its front candidates are evaluated through
the REST route on the shipped local task by the driver (Ray actor), the dense model is scored once, the scores
appear in the parent's front, and the score equals our own forward's on the downloaded model. A task name lm_eval
does not know and a hub task on an offline driver fail the job with what to do."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from browser import Browser, chromium_binary
from test_end_to_end import _wait, download_model
from test_evaluate import TASK, _our_accuracy

from darwinfront.stack import EmbeddedStack
from workers import harness, modeling

pytestmark = pytest.mark.integration

PARENT = {
    "name": "evaluate parent",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "train_tokens": 0, "eval_tokens": 512, "seq_len": 64},
    "prune": {"targets": [0.25, 0.5], "criterion": "wanda_sp", "training_aware": False, "levels": 8},
    "search": {"generations": 1, "offspring": 2},
    "seed": 4,
}
LIMIT = 10
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # as on a driver without the hub


@pytest.fixture(scope="module")
def stack(tmp_path_factory, micro_dir):
    """One embedded stack whose driver has the hub switched off."""
    previous = {name: os.environ.get(name) for name in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        with EmbeddedStack(tmp_path_factory.mktemp("stack"), port=0) as running:
            yield running
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def parent(http):
    job = _wait(http, http.post("/v1/jobs", json=PARENT).json()["id"])
    assert job["status"] == "succeeded", job
    return job["id"]


def _evaluate(http, parent: str, cid: str, tasks: list[str]) -> dict:
    response = http.post(f"/v1/jobs/{parent}/candidates/{cid}/evaluate", json={"tasks": tasks, "limit": LIMIT})
    assert response.status_code == 201, response.text
    return _wait(http, response.json()["id"])


def _prepared(http, job_id: str) -> dict:
    events = http.get(f"/v1/jobs/{job_id}/events").json()["events"]
    return next(e["data"] for e in events if e["kind"] == "prepared")


def test_two_candidates_scored_through_the_route_share_one_dense_score(stack, http, parent, tmp_path):
    points = http.get(f"/v1/jobs/{parent}/front").json()["points"]
    assert len(points) >= 2, points
    first, second = (p["candidate_id"] for p in points[:2])

    jobs = [_evaluate(http, parent, cid, [TASK]) for cid in (first, second)]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    assert _prepared(http, jobs[0]["id"])["dense_to_score"] == [TASK]
    assert _prepared(http, jobs[1]["id"])["dense_to_score"] == [] and _prepared(http, jobs[1]["id"])[
        "dense_cached"] == [TASK]

    front = {p["candidate_id"]: p for p in http.get(f"/v1/jobs/{parent}/front").json()["points"]}
    scored = [front[cid]["scores"][TASK] for cid in (first, second)]
    assert scored[0]["dense"] == scored[1]["dense"] and scored[0]["samples"] == LIMIT
    assert [s["job"] for s in scored] == [j["id"] for j in jobs]
    for s in scored:
        assert s["metric"] == "acc" and 0.0 <= s["value"] <= 1.0 and s["delta"] == s["value"] - s["dense"]["value"]
    assert http.get(f"/v1/jobs/{parent}/candidates/{first}/scores").json()[TASK] == scored[0]
    evaluation = http.get(f"/v1/jobs/{jobs[0]['id']}/candidates/{first}/config").json()["evaluation"]
    assert evaluation["scores"][TASK] == scored[0] and evaluation["job"] == parent

    docs = [json.loads(line) for line in (harness.TASKS_DIR / "pydoc_mc.jsonl").read_text().splitlines()[:LIMIT]]
    model = download_model(http, parent, first, tmp_path)
    _, tokenizer = modeling.load_model(PARENT["model"]["source"], device="cpu")
    assert scored[0]["value"] == pytest.approx(_our_accuracy(model, tokenizer, docs)[0])
    dense, _ = modeling.load_model(PARENT["model"]["source"], device="cpu")
    assert scored[0]["dense"]["value"] == pytest.approx(_our_accuracy(dense, tokenizer, docs)[0])
    _dashboard_shows_the_scores(stack, parent, tmp_path)


def _dashboard_shows_the_scores(stack, parent: str, tmp_path) -> None:
    """The dashboard's front table has the lm-eval column, the task in the scored rows (CI has Chromium)."""
    if chromium_binary() is None:
        assert not os.environ.get("CI"), "CI must install Debian's chromium (.ci/run does)"
        return
    with Browser(tmp_path / "profile") as browser:
        browser.call("Page.navigate", url=f"{stack.url}/dashboard#job={parent}&key={stack.key}")
        browser.wait_for("document.getElementById('job').dataset.stream === 'ended'")
        text = browser.wait_for("(t => t.includes('lm-eval (dense)') && t)"
                                "(document.getElementById('front-table').textContent)")
        assert text.count(f"{TASK} acc ") >= 2


def test_an_unknown_task_and_a_hub_task_offline_fail_the_job_saying_what_to_do(http, parent):
    cid = http.get(f"/v1/jobs/{parent}/front").json()["points"][0]["candidate_id"]
    unknown = _evaluate(http, parent, cid, ["darwinfront_pydoc_mcq"])
    assert unknown["status"] == "failed"
    assert "unknown lm_eval task(s) darwinfront_pydoc_mcq" in unknown["error"]
    assert f"did you mean {TASK}" in unknown["error"] and "lm_eval ls tasks" in unknown["error"]

    hub = _evaluate(http, parent, cid, ["arc_easy"])
    assert hub["status"] == "failed"
    assert "needs its dataset from the Hugging Face hub" in hub["error"] and "HF_HUB_OFFLINE" in hub["error"]
    assert "local task" in hub["error"]
