"""Post-training end to end over real HTTP: a prune job runs, one of its front candidates is post-trained through
the REST route by the driver (Ray actor), and the downloaded archive gives the KL the job reports."""

from __future__ import annotations

import pytest
from test_end_to_end import _wait, download_model, http, stack  # noqa: F401  (the embedded stack fixtures, started once here)

from darwinfront.core.methods import parse_spec
from workers import fitness, modeling, slicing
from workers.posttrain_job import load_pools

pytestmark = pytest.mark.integration

PARENT = {
    "name": "posttrain parent",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "train_tokens": 2048, "eval_tokens": 512, "seq_len": 64},
    "prune": {"targets": [0.5], "criterion": "wanda_sp", "training_aware": False, "levels": 8},
    "search": {"generations": 1, "offspring": 2},
    "seed": 4,
}
OPTIONS = {"tokens": 4096, "lr": 1e-3, "batch_size": 8, "loss": "kd", "seed": 2}


def test_a_front_candidate_post_trained_through_the_route(http, tmp_path):  # noqa: F811
    parent = _wait(http, http.post("/v1/jobs", json=PARENT).json()["id"])
    assert parent["status"] == "succeeded", parent
    point = http.get(f"/v1/jobs/{parent['id']}/front").json()["points"][0]
    cid = point["candidate_id"]
    parent_configuration = http.get(f"/v1/jobs/{parent['id']}/candidates/{cid}/config").json()

    response = http.post(f"/v1/jobs/{parent['id']}/candidates/{cid}/posttrain", json=OPTIONS)
    assert response.status_code == 201, response.text
    job = _wait(http, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["step"] == job["progress"]["steps"] == 8 and job["progress"]["tokens"] == 4096

    configuration = http.get(f"/v1/jobs/{job['id']}/candidates/{cid}/config").json()
    post = configuration["posttrain"]
    assert post["job"] == parent["id"] and post["start"] == "archive" and post["tokens"] == 4096
    assert post["after"]["kl"] < post["before"]["kl"] and post["after"]["held_out_kl"] < post["before"]["held_out_kl"]
    [followed] = http.get(f"/v1/jobs/{job['id']}/front").json()["points"]
    assert followed["candidate_id"] == cid and followed["objectives"]["params"] == point["objectives"]["params"]
    kinds = [e["kind"] for e in http.get(f"/v1/jobs/{job['id']}/events").json()["events"]]
    assert kinds[:3] == ["queued", "running", "started"] and "prepared" in kinds and "training" in kinds
    assert kinds[-2:] == ["posttrained", "succeeded"]

    model = download_model(http, job["id"], cid, tmp_path)
    assert slicing.count_parameters(model) == parent_configuration["parameters"] == point["objectives"]["params"]

    spec = parse_spec(PARENT)
    dense, tokenizer = modeling.load_model(spec.model.source, device="cpu")
    pools = load_pools(spec, tokenizer, OPTIONS["tokens"])
    teacher = fitness.Teacher.of(dense, pools.held_out)
    held_out_kl, perplexity = fitness.kl_and_perplexity(model, pools.held_out, teacher)
    kl = fitness.kl(model, pools.calibration, fitness.Teacher.of(dense, pools.calibration))
    assert held_out_kl == pytest.approx(post["after"]["held_out_kl"], abs=1e-5)
    assert perplexity == pytest.approx(post["after"]["perplexity"], rel=1e-5)
    assert kl == pytest.approx(post["after"]["kl"], abs=1e-5) and kl == pytest.approx(followed["objectives"]["kl"])
    print(f"\nposttrain {cid}: KL {post['before']['kl']:.5f} -> {post['after']['kl']:.5f}, held-out KL "
          f"{post['before']['held_out_kl']:.5f} -> {post['after']['held_out_kl']:.5f}, perplexity "
          f"{post['before']['perplexity']:.2f} -> {post['after']['perplexity']:.2f}")

    assert http.get(f"/v1/jobs/{parent['id']}").json() == parent  # the parent is untouched
    assert http.get(f"/v1/jobs/{parent['id']}/candidates/{cid}/config").json() == parent_configuration
