"""darwinfront on a real multi-node Ray cluster without a shared disk (`tests/cluster.py`): a head that runs no
evaluator, and two evaluator nodes, each in its own mount namespace with its own temporary, cache and data
directories and blind to the head's and the driver's. The driver joins with `RAY_ADDRESS` and the cluster's token.

- A prune job, a KV job and a posttrain job succeed; their downloads are non-empty and reload; the prune and KV
  fronts equal the single-node run's with the same seed (the golden fronts, which `test_golden_fronts.py` checks
  against a single-node run).
- Node loss: one evaluator node is killed (raylet and workers) mid-job; the job completes on the other node, with
  every planned candidate recorded once, and its events say what happened.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import over_http
import pytest
import redis
from cluster import Cluster, available
from test_end_to_end import download_model
from test_golden_fronts import GOLDEN, SPECS, front_of

from darwinfront.core.methods import parse_spec
from darwinfront.core.store import JobStore
from darwinfront.stack import EmbeddedStack
from workers import slicing
from workers.kv.cache import KVPrecisionConfig

pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(available()), reason=available() or "ok")]

TWO = {"resources": {"evaluators": 2}}  # one evaluator per node: each node offers one CPU
LOSS_SPEC = {  # training-aware stages, so the search lasts long enough to lose a node in it
    "name": "node loss",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "eval_tokens": 256, "seq_len": 64, "database_tokens": 512,
             "train_tokens": 2048},
    "prune": {"targets": [0.4], "criterion": "wanda_sp", "levels": 16},
    "search": {"generations": 8, "offspring": 4, "train_tokens": [512, 1024]},
    "resources": {"evaluators": 2},
    "seed": 5,
}
POSTTRAIN = {"tokens": 1024, "lr": 1e-3, "batch_size": 8, "loss": "kd", "seed": 2}


@pytest.fixture(scope="module")
def cluster(micro_dir):
    # Not under pytest's tmp_path: Ray's socket paths inside a node's temp dir must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="dfc-", dir="/tmp"))
    hidden = [Path(os.environ[name]) for name in ("DARWINFRONT_CACHE_DIR", "DARWINFRONT_DATA_DIR")]
    running = Cluster(root, hidden=hidden, seed=[Path(micro_dir)])
    try:
        running.start()
        running.add_node("node-a", cpus=1, evaluators=1)
        running.add_node("node-b", cpus=1, evaluators=1)
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def http(cluster):
    env = {**cluster.driver_env(), "DARWINFRONT_PLACEMENT_TIMEOUT_SECONDS": "5", "RAY_AUTH_MODE": None}
    saved = {name: os.environ.get(name) for name in env}
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        with EmbeddedStack(cluster.head_dir / "data", port=0) as stack, over_http.client(stack) as client:
            client.stack = stack
            yield client
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run(http, spec: dict, timeout: float = 900) -> dict:
    response = http.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = over_http.wait(http, response.json()["id"], over_http.finished, timeout=timeout)
    return job


def _archive_members(http, job_id: str, candidate_id: str) -> list[str]:
    response = http.get(f"/v1/jobs/{job_id}/candidates/{candidate_id}/model")
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        return [m.name for m in tar.getmembers() if m.isfile()]


def _events(http, job_id: str) -> list[dict]:
    return http.get(f"/v1/jobs/{job_id}/events").json()["events"]


@pytest.fixture(scope="module")
def prune_job(http):
    return _run(http, {**SPECS["structured_prune"], **TWO, "name": "multinode prune"})


def test_prune_job_succeeds_its_archives_reload_and_its_front_is_the_single_node_one(http, prune_job, tmp_path):
    expected = json.loads(GOLDEN.read_text())["structured_prune"]
    got = front_of(http, prune_job["id"])  # the search's front is published before the export: check it first
    assert [p["candidate_id"] for p in got] == [p["candidate_id"] for p in expected]
    for point, want in zip(got, expected, strict=True):
        for name, value in want["objectives"].items():
            assert point["objectives"][name] == pytest.approx(value, rel=2e-2, abs=1e-6), (point, name)
    assert prune_job["status"] == "succeeded", prune_job.get("error")
    for i, point in enumerate(http.get(f"/v1/jobs/{prune_job['id']}/front").json()["points"]):
        cid = point["candidate_id"]
        members = _archive_members(http, prune_job["id"], cid)
        assert any(name.endswith(".safetensors") for name in members), (cid, members)  # never an empty archive
        folder = tmp_path / str(i)
        folder.mkdir()
        model = download_model(http, prune_job["id"], cid, folder)
        assert slicing.count_parameters(model) == point["objectives"]["params"]


def test_kv_job_succeeds_with_the_single_node_front_and_its_configurations_load(http):
    job = _run(http, {**SPECS["kv_precision"], **TWO, "name": "multinode kv"})
    assert job["status"] == "succeeded", job.get("error")
    expected = json.loads(GOLDEN.read_text())["kv_precision"]
    got = front_of(http, job["id"])
    assert [p["candidate_id"] for p in got] == [p["candidate_id"] for p in expected]
    for point, want in zip(got, expected, strict=True):
        for name, value in want["objectives"].items():
            assert point["objectives"][name] == pytest.approx(value, rel=2e-2, abs=1e-6), (point, name)
    for point in got:
        document = http.get(f"/v1/jobs/{job['id']}/candidates/{point['candidate_id']}/config").json()
        precision = KVPrecisionConfig.from_kv_map(document["kv_map"])
        assert len(precision.layers) == document["model"]["num_hidden_layers"]


def test_posttrain_job_succeeds_and_its_archive_reloads(http, prune_job, tmp_path):
    assert prune_job["status"] == "succeeded", prune_job.get("error")
    point = http.get(f"/v1/jobs/{prune_job['id']}/front").json()["points"][0]
    cid = point["candidate_id"]
    response = http.post(f"/v1/jobs/{prune_job['id']}/candidates/{cid}/posttrain", json=POSTTRAIN)
    assert response.status_code == 201, response.text
    job = over_http.wait(http, response.json()["id"], over_http.finished, timeout=600)
    assert job["status"] == "succeeded", job.get("error")
    members = _archive_members(http, job["id"], cid)
    assert any(name.endswith(".safetensors") for name in members), members
    model = download_model(http, job["id"], cid, tmp_path)
    assert slicing.count_parameters(model) == point["objectives"]["params"]


def test_a_lost_node_mid_job_leaves_the_job_whole(cluster, http):
    """Last in the module: it kills node A."""
    from workers import tracking

    response = http.post("/v1/jobs", json=LOSS_SPEC)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    def started(job: dict) -> bool:
        return over_http.finished(job) or (job.get("progress") or {}).get("evaluations", 0) >= 2

    over_http.wait(http, job_id, started, timeout=600)
    [node_a] = [n for n in cluster.nodes if n.name == "node-a"]
    node_a.kill()
    job = over_http.wait(http, job_id, over_http.finished, timeout=600)

    # the search's record first: it is complete before the job exports its front
    events = _events(http, job_id)
    kinds = [e["kind"] for e in events]
    assert "evaluator_lost" in kinds, kinds
    lost = next(e for e in events if e["kind"] == "evaluator_lost")["data"]
    assert lost["retried"] is True and lost["candidate_id"]
    for event in events:  # node B has room for one evaluator only: a replacement waits, and is dropped in time
        if event["kind"] == "evaluator_dropped":
            assert event["data"]["evaluators"] == 1 and "within 5 s" in event["data"]["reason"]

    planned = parse_spec(LOSS_SPEC).planned_evaluations()
    study = tracking.open_study(http.stack.redis_url, job_id)
    trials = study.get_trials(deepcopy=False)
    ids = [t.user_attrs["candidate_id"] for t in trials]
    with redis.Redis.from_url(http.stack.redis_url) as client:
        _, state = JobStore(client).load_checkpoint(job_id)
    [told] = [search["evaluations"] for search in state["strategies"]]  # results the search was told
    assert len(ids) == len(set(ids)) == told <= planned  # every candidate recorded once: none lost or doubled
    assert state["strategies"][0]["completed"] == LOSS_SPEC["search"]["generations"] or state["strategies"][0][
        "exhausted"]  # the search ran to its end (or ran out of unseen offspring)
    assert lost["candidate_id"] in ids
    failed = [t.user_attrs for t in trials if t.state.name == "FAIL"]  # early stages are PRUNED, not failed
    assert not failed, failed
    front = http.get(f"/v1/jobs/{job_id}/front").json()["points"]
    assert front and {p["candidate_id"] for p in front} <= set(ids)

    assert job["status"] == "succeeded", job.get("error")
    assert job["progress"]["evaluations"] == told
    assert kinds[-1] == "succeeded"
