"""The whole path over real HTTP: embedded Redis, a driver process with a local Ray, the API server.

submit -> poll until succeeded -> front -> download a configuration -> apply -> recompute; cancel; failure.
"""

from __future__ import annotations

import json
import os
import tarfile
import time

import httpx
import pytest
import torch

from darwinfront.core.methods import parse_spec
from darwinfront.stack import EmbeddedStack
from workers import fitness, metrics, modeling, slicing
from workers.data import load_texts, token_sequences

pytestmark = pytest.mark.integration

SPEC = {
    "name": "e2e",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 1024, "eval_tokens": 512, "seq_len": 64},
    # masks scored as cut, so applying the downloaded configuration to the dense model recomputes the front's KL
    "prune": {"targets": [0.25, 0.5], "criterion": "wanda_sp", "training_aware": False, "levels": 16},
    "search": {"generations": 3, "offspring": 4},
    "seed": 3,
}


def download_model(http: httpx.Client, job_id: str, candidate_id: str, folder):
    """GET a candidate's model archive, unpack it into `folder` and load it with `load_pruned`."""
    response = http.get(f"/v1/jobs/{job_id}/candidates/{candidate_id}/model")
    assert response.status_code == 200
    archive = folder / "model.tar"
    archive.write_bytes(response.content)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return slicing.load_pruned(folder / candidate_id)[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, micro_dir):
    """One embedded stack for the module (Ray starts once); the micro model is built before the driver runs. Its
    driver waits 2 s for GPUs that are not there (test_a_job_asking_for_absent_gpus_fails_and_the_next_runs)."""
    data_dir = tmp_path_factory.mktemp("stack")
    previous = os.environ.get("DARWINFRONT_PLACEMENT_TIMEOUT_SECONDS")
    os.environ["DARWINFRONT_PLACEMENT_TIMEOUT_SECONDS"] = "2"
    try:
        with EmbeddedStack(data_dir, port=0) as running:
            yield running
    finally:
        if previous is None:
            os.environ.pop("DARWINFRONT_PLACEMENT_TIMEOUT_SECONDS", None)
        else:
            os.environ["DARWINFRONT_PLACEMENT_TIMEOUT_SECONDS"] = previous


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30) as client:
        yield client


def _wait(http, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


@pytest.fixture(scope="module")
def finished_job(http):
    response = http.post("/v1/jobs", json=SPEC)
    assert response.status_code == 201, response.text
    job = _wait(http, response.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def test_submit_poll_front_download_apply(http, finished_job, tmp_path):
    job_id = finished_job["id"]
    assert finished_job["progress"]["evaluations"] == parse_spec(SPEC).planned_evaluations()

    front = http.get(f"/v1/jobs/{job_id}/front").json()
    points = front["points"]
    assert len(points) >= 2
    params = [p["objectives"]["params"] for p in points]
    kls = [p["objectives"]["kl"] for p in points]
    assert params == sorted(params) and kls == sorted(kls, reverse=True)  # a front: smaller means worse

    point = points[0]
    response = http.get(f"/v1/jobs/{job_id}/candidates/{point['candidate_id']}/config")
    assert response.status_code == 200
    configuration = response.json()

    spec = parse_spec(SPEC)
    model, tokenizer = modeling.load_model(spec.model.source, device="cpu")
    tokens = token_sequences(
        tokenizer, load_texts(spec.data.source), n_tokens=spec.data.calibration_tokens,
        seq_len=spec.data.seq_len, split="calibration", seed=spec.seed,
    )
    teacher = metrics.teacher_logprobs(model, tokens, batch_size=8)
    slicing.apply_configuration(model, configuration)
    assert slicing.count_parameters(model) == point["objectives"]["params"] == configuration["parameters"]
    kl = fitness.kl(model, tokens, fitness.Teacher(logprobs=teacher))
    assert kl == pytest.approx(point["objectives"]["kl"], abs=1e-4)
    generated = model.generate(**tokenizer("The if statement", return_tensors="pt"), max_new_tokens=5)
    assert generated.shape[1] > 0

    reloaded = download_model(http, job_id, point["candidate_id"], tmp_path)
    with torch.inference_mode():
        assert torch.allclose(reloaded(tokens[:2]).logits, model(tokens[:2]).logits, atol=1e-5)


def test_every_evaluation_is_in_the_optuna_study(stack, finished_job):
    from workers import tracking

    study = tracking.open_study(stack.redis_url, finished_job["id"])
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == finished_job["progress"]["evaluations"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete and all(len(t.values) == 2 for t in complete)
    assert all("genome" in t.user_attrs for t in trials)


def test_events_tell_the_story(http, finished_job):
    events = http.get(f"/v1/jobs/{finished_job['id']}/events").json()["events"]
    kinds = [e["kind"] for e in events]
    assert kinds[0] in ("queued", "started") and kinds[-1] == "succeeded"
    assert kinds.count("generation") == SPEC["search"]["generations"] + 1


def test_cancel_stops_within_a_generation_and_keeps_the_front(http):
    spec = json.loads(json.dumps(SPEC)) | {"name": "to cancel"}
    spec["search"] = spec["search"] | {"generations": 200}
    job_id = http.post("/v1/jobs", json=spec).json()["id"]
    deadline = time.monotonic() + 300
    while (http.get(f"/v1/jobs/{job_id}").json().get("progress") or {}).get("generation", -1) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    cancelled_at = http.get(f"/v1/jobs/{job_id}").json()["progress"]["generation"]
    job = _wait(http, job_id, timeout=120)
    assert job["status"] == "cancelled"
    assert job["progress"]["generation"] <= cancelled_at + 1
    assert http.get(f"/v1/jobs/{job_id}/front").json()["points"]


def test_a_model_that_cannot_load_fails_with_a_readable_error(http, stack, tmp_path_factory, monkeypatch):
    broken = stack.data_dir / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    spec = SPEC | {"model": {"source": str(broken), "device": "cpu"}, "name": "broken"}
    response = http.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = _wait(http, response.json()["id"], timeout=120)
    assert job["status"] == "failed"
    assert job["error"] and "Traceback" not in job["error"]


def test_a_job_asking_for_absent_gpus_fails_and_the_next_runs(http, finished_job):
    spec = SPEC | {"name": "gpus", "resources": {"evaluators": 1, "gpus_per_evaluator": 1}}
    response = http.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = _wait(http, response.json()["id"], timeout=120)
    assert job["status"] == "failed"
    assert "resources.gpus_per_evaluator" in job["error"] and "Traceback" not in job["error"]
    after = http.post("/v1/jobs", json=SPEC | {"name": "after gpus", "search": {"generations": 1, "offspring": 2}})
    assert _wait(http, after.json()["id"])["status"] == "succeeded"


KV_SPEC = {
    "name": "kv e2e",
    "method": "kv_precision",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "seq_len": 64},
    "kv": {"mode": "kivi", "group_size": 16, "residual": 32, "trials": 16, "population": 8, "profile_sequences": 4},
    "seed": 2,
}


def test_kv_precision_job_end_to_end(http, stack):
    from workers.kv.cache import KVPrecisionConfig, build_cache
    from workers.kv_evaluator import kl_with_cache

    response = http.post("/v1/jobs", json=KV_SPEC)
    assert response.status_code == 201, response.text
    job = _wait(http, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["evaluations"] == KV_SPEC["kv"]["trials"]

    table = http.get(f"/v1/jobs/{job['id']}/sensitivity").json()
    assert table["num_layers"] == 2 and len(table["layers"][0]["pairs"]) == 9

    points = http.get(f"/v1/jobs/{job['id']}/front").json()["points"]
    assert len(points) >= 2
    bits = [p["objectives"]["bits"] for p in points]
    kls = [p["objectives"]["kl"] for p in points]
    assert bits == sorted(bits) and kls == sorted(kls, reverse=True)
    assert {p["preset"] for p in points} & {"KV8", "KV2", "K4V2", "KV4", "K8V4"}  # the seeded presets compete

    point = points[len(points) // 2]
    configuration = http.get(f"/v1/jobs/{job['id']}/candidates/{point['candidate_id']}/config").json()
    assert configuration["bits"]["nominal"] == pytest.approx(point["objectives"]["bits"])
    model, tokenizer = modeling.load_model("builtin:micro-llama", device="cpu")
    config = KVPrecisionConfig.from_dict({k: configuration[k] for k in ("layers", "mode", "group_size", "residual")})
    tokens = token_sequences(tokenizer, load_texts("builtin:pydoc"), n_tokens=512, seq_len=64,
                             split="calibration", seed=KV_SPEC["seed"])
    teacher = metrics.teacher_logprobs(model, tokens, batch_size=8)
    assert kl_with_cache(model, tokens, teacher, config) == pytest.approx(point["objectives"]["kl"], abs=1e-6)
    prompt = tokenizer("The for statement", return_tensors="pt")
    out = model.generate(**prompt, past_key_values=build_cache(model, config), max_new_tokens=40, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 40

    assert http.get(f"/v1/jobs/{job['id']}/candidates/{point['candidate_id']}/model").status_code == 404
