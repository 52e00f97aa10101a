"""The real pretrained SmolLM2-135M end to end over REST: its obs database built in the run, reported layer by
layer before the first generation, and the winner reproduced from its downloaded configuration and archive."""

from __future__ import annotations

import tarfile
import time

import httpx
import pytest

from darwinfront.core.methods import parse_spec
from darwinfront.stack import EmbeddedStack
from workers import fitness, modeling, slicing
from workers.configuration import rebuild
from workers.job_inputs import token_pools

pytestmark = pytest.mark.integration

SPEC = {
    "name": "smollm2",
    "model": {"source": "builtin:smollm2-135m", "device": "cpu"},
    "data": {"calibration_tokens": 512, "train_tokens": 0, "database_tokens": 2048, "eval_tokens": 512,
             "seq_len": 128},
    "prune": {"targets": [0.5], "criterion": "obs", "training_aware": False},
    "search": {"generations": 1, "offspring": 2, "survivors": [1]},
    "seed": 0,
}


@pytest.fixture(scope="module")
def smollm2_dir():
    """The dequantized SmolLM2-135M directory, built once per run (into $DARWINFRONT_CACHE_DIR)."""
    pytest.importorskip("gguf")
    return modeling.resolve_source("builtin:smollm2-135m")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, smollm2_dir):
    with pytest.MonkeyPatch.context() as mp:  # a database of this run's own: built here, layer by layer
        mp.setenv("DARWINFRONT_DATABASE_DIR", str(tmp_path_factory.mktemp("databases")))
        yield from _run_job(tmp_path_factory)


def _run_job(tmp_path_factory):
    with EmbeddedStack(tmp_path_factory.mktemp("stack"), port=0) as stack, httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=60
    ) as http:
        response = http.post("/v1/jobs", json=SPEC)
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + 1500
        while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job still {job['status']}: {job['progress']}"
            time.sleep(1.0)
        assert job["status"] == "succeeded", (job["error"], job["progress"])
        events = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()["events"]
        front = http.get(f"/v1/jobs/{job_id}/front").json()
        best = min(front["points"], key=lambda p: p["objectives"]["kl"])
        cid = best["candidate_id"]
        configuration = http.get(f"/v1/jobs/{job_id}/candidates/{cid}/config").json()
        folder = tmp_path_factory.mktemp("download")
        (folder / "model.tar").write_bytes(http.get(f"/v1/jobs/{job_id}/candidates/{cid}/model").content)
        with tarfile.open(folder / "model.tar") as tar:
            tar.extractall(folder, filter="data")
        yield {"job": job, "events": events, "best": best, "configuration": configuration, "archive": folder / cid}


def test_database_layers_are_reported_before_the_first_generation(finished):
    items = finished["events"]
    kinds = [e["kind"] for e in items]
    first_generation = kinds.index("generation")
    layers = [e["data"]["done"] for e in items[:first_generation]
              if e["kind"] == "prepare" and e["data"].get("step") == "database" and "done" in e["data"]]
    assert layers == list(range(1, 31))
    steps = {e["data"]["step"] for e in items[:first_generation] if e["kind"] == "prepare"}
    assert {"model", "database", "dense", "evaluators"} <= steps


def test_the_downloaded_configuration_and_archive_give_the_fronts_kl(finished, smollm2_dir):
    spec = parse_spec(SPEC)
    dense, tokenizer = modeling.load_model(smollm2_dir, device="cpu")
    calibration = token_pools(tokenizer, spec.data, spec.seed)["calibration"]
    teacher = fitness.Teacher.of(dense, calibration)
    front_kl = finished["best"]["objectives"]["kl"]

    model, _ = modeling.load_model(smollm2_dir, device="cpu")
    rebuild(model, tokenizer, finished["configuration"])  # the README's path, obs weights included
    assert fitness.kl(model, calibration, teacher) == pytest.approx(front_kl, abs=1e-4)

    archived, _ = slicing.load_pruned(finished["archive"])
    assert slicing.count_parameters(archived) == finished["configuration"]["parameters"]
    assert fitness.kl(archived, calibration, teacher) == pytest.approx(front_kl, abs=1e-4)
    assert finished["configuration"]["parameters"] < 0.75 * slicing.count_parameters(dense)
