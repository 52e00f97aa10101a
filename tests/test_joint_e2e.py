"""A joint job over real HTTP: submit, poll, front against memory, download; the downloaded model archive and its
joint configuration give the sliced model and its mixed-precision cache in one call, and `generate` runs; a job asked
for latency searches and reports (KL, memory, latency)."""

from __future__ import annotations

import tarfile
import time

import httpx
import pytest

from darwinfront.core.methods import parse_spec
from darwinfront.stack import EmbeddedStack
from search.pareto import dominates
from service.history import front_hypervolume
from workers import fitness, modeling
from workers.job_inputs import token_pools
from workers.joint_load import load_joint
from workers.kv.cache import build_cache

pytestmark = pytest.mark.integration

SPEC = {
    "name": "joint e2e",
    "method": "joint",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "eval_tokens": 128, "train_tokens": 0, "database_tokens": 1024,
             "seq_len": 64},
    "prune": {"criterion": "wanda_sp", "levels": 4, "targets": [0.25, 0.5]},
    "kv": {"mode": "kivi", "group_size": 16, "residual": 32, "profile_sequences": 4},
    "deployment": {"batch_size": 4, "context": 2048, "dtype": "bfloat16"},
    "joint": {"strategy": "evolution", "evaluations": 10, "population": 4, "memory_cap": "1MiB"},
    "seed": 5,
}


@pytest.fixture(scope="module")
def http(tmp_path_factory, micro_dir):
    with EmbeddedStack(tmp_path_factory.mktemp("stack"), port=0) as stack, httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30
    ) as client:
        yield client


def _wait(http, job_id, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']}")


def test_bad_joint_specs_name_their_field(http):
    bad_cap = http.post("/v1/jobs", json=SPEC | {"joint": {"memory_cap": "6 parsecs"}})
    assert bad_cap.status_code == 422 and "joint.memory_cap" in bad_cap.text
    unknown = http.post("/v1/jobs", json=SPEC | {"joint": {"seed_jobs": ["nosuchjob"]}})
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "joint.seed_jobs.0"


def test_joint_job_end_to_end(http, tmp_path):
    response = http.post("/v1/jobs", json=SPEC)
    assert response.status_code == 201, response.text
    job = _wait(http, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["evaluations"] == SPEC["joint"]["evaluations"]
    assert job["progress"]["deployment"] == SPEC["deployment"]

    front = http.get(f"/v1/jobs/{job['id']}/front").json()
    assert [o["name"] for o in front["objectives"]] == ["kl", "memory"]
    points = front["points"]
    memory = [p["objectives"]["memory"] for p in points]
    kls = [p["objectives"]["kl"] for p in points]
    assert len(points) >= 2 and memory == sorted(memory) and kls == sorted(kls, reverse=True)
    assert all(m <= 2**20 for m in memory)  # the cap

    # the history scales memory by the dense model's at the deployment point: every generation has a hypervolume,
    # growing, the last one the final front's
    history = http.get(f"/v1/jobs/{job['id']}/history").json()
    prepared = next(e for e in http.get(f"/v1/jobs/{job['id']}/events").json()["events"] if e["kind"] == "prepared")
    assert history["dense_bytes"] == prepared["data"]["dense_memory"] > max(memory)
    volumes = [p["hypervolume"] for p in history["points"]]
    assert len(volumes) >= 2 and None not in volumes and volumes == sorted(volumes) and 0 < volumes[-1] < 1
    assert volumes[-1] == pytest.approx(front_hypervolume(front, {"bytes": history["dense_bytes"]}))

    point = points[len(points) // 2]
    configuration = http.get(f"/v1/jobs/{job['id']}/candidates/{point['candidate_id']}/config").json()
    assert configuration["memory"]["memory"] == point["objectives"]["memory"]
    assert configuration["deployment"] == SPEC["deployment"]
    assert configuration["memory"]["weight_bytes"] == 2 * configuration["prune"]["parameters"]  # bfloat16

    archive = tmp_path / "model.tar"
    archive.write_bytes(http.get(f"/v1/jobs/{job['id']}/candidates/{point['candidate_id']}/model").content)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    model, tokenizer, cache = load_joint(tmp_path / point["candidate_id"])
    assert sum(p.numel() for p in model.parameters()) == configuration["prune"]["parameters"]

    # the downloaded pair recomputes the front's KL: the dense model's outputs on the job's fitness pool
    spec = parse_spec(SPEC)
    dense, dense_tokenizer = modeling.load_model("builtin:micro-llama", device="cpu")
    tokens = token_pools(dense_tokenizer, spec.data, spec.seed)["calibration"]
    teacher = fitness.Teacher.of(dense, tokens, topk="auto")
    config = cache().precision
    kl = fitness.kl(model, tokens, teacher,
                    cache=lambda: build_cache(model, config, storage="simulated", quantize_in_forward=True))
    assert kl == pytest.approx(point["objectives"]["kl"], rel=1e-4, abs=1e-6)

    prompt = tokenizer("The for statement", return_tensors="pt")
    held = cache()
    out = model.generate(**prompt, past_key_values=held, max_new_tokens=30, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 30
    assert held.nbytes() > 0 and {layer.k_bits for layer in held.layers} == {k for k, _ in config.layers}


def test_a_joint_job_asked_for_latency_searches_and_reports_three_objectives(http):
    spec = SPEC | {"name": "joint latency e2e",
                   "deployment": {**SPEC["deployment"], "latency": {"context": 64, "repeats": 3}},
                   "joint": {"strategy": "nsga2", "evaluations": 6, "population": 3, "memory_cap": "1MiB"}}
    response = http.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = _wait(http, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["deployment"]["latency"] == {"context": 64, "warmup": 2, "repeats": 3}

    front = http.get(f"/v1/jobs/{job['id']}/front").json()
    assert [(o["name"], o["unit"]) for o in front["objectives"]] == [("kl", "nats"), ("memory", "bytes"),
                                                                    ("latency", "ms")]
    points = [tuple(p["objectives"][name] for name in ("kl", "memory", "latency")) for p in front["points"]]
    assert points and all(latency > 0 and memory <= 2**20 for _, memory, latency in points)
    assert not any(dominates(a, b) for a in points for b in points)

    history = http.get(f"/v1/jobs/{job['id']}/history").json()
    assert history["dense_latency_ms"] > 0
    dense = {"bytes": history["dense_bytes"], "ms": history["dense_latency_ms"]}
    volume = history["points"][-1]["hypervolume"]
    assert 0 < volume < 1 and volume == pytest.approx(front_hypervolume(front, dense))

    point = front["points"][0]
    configuration = http.get(f"/v1/jobs/{job['id']}/candidates/{point['candidate_id']}/config").json()
    assert configuration["metrics"]["latency"] == point["objectives"]["latency"]
    assert configuration["deployment"]["latency"] == job["spec"]["deployment"]["latency"]
