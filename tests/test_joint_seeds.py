"""A joint job's seed jobs: refused over the API unless they are the tenant's finished prune or KV jobs on the same
model (naming `joint.seed_jobs.<i>`), and turned by the runner into every pair of their front points. A real
(embedded) Redis; no driver: the tests write what the seed jobs' drivers write."""

from __future__ import annotations

from darwinfront.core.methods import parse_spec
from darwinfront.core.status import JobStatus
from darwinfront.core.store import JobStore
from search.genome import LevelSpace
from search.joint_space import CacheGeometry, Deployment, JointGenome, JointSpace
from search.kv_space import KVGroup, KVSpace
from workers.joint_job import JointJob

pytest_plugins = ["service_fixtures"]

MODEL = {"source": "builtin:micro-llama", "device": "cpu"}
PRUNE = {"model": MODEL, "search": {"generations": 1, "offspring": 2}}
KV = {"method": "kv_precision", "model": MODEL, "kv": {"trials": 4}}
SPACE = JointSpace(
    LevelSpace(n_layers=2, attn_levels=2, mlp_levels=4, attn_unit_params=10, mlp_level_params=5, dense_params=1000),
    KVSpace((KVGroup((0, 1), ((16, 16), (8, 8), (4, 4), (2, 2))),), 2),
    CacheGeometry(kv_heads=2, head_dim=16, heads_per_level=1, mode="kivi", token_group=16, key_group=16,
                  residual=32),
    Deployment(1, 128, 2),
)


def _finished(store: JobStore, spec: dict, results: list[dict], *, status=JobStatus.succeeded,
              tenant: str = "alpha") -> str:
    job_id = store.create(tenant, parse_spec(spec).model_dump(mode="json")).id
    while store.claim("test-driver", timeout=0) not in (job_id, None):
        pass
    for i, result in enumerate(results):
        store.put_result(job_id, f"c{i}", result)
    store.set_front(job_id, [{"candidate_id": f"c{i}", "objectives": {}} for i in range(len(results))],
                    objectives=[])
    if status is not JobStatus.running:
        store.set_status(job_id, status)
    return job_id


def _joint(seed_jobs: list[str], model: dict = MODEL) -> dict:
    return {"method": "joint", "model": model, "joint": {"seed_jobs": seed_jobs, "evaluations": 20}}


def test_seed_jobs_are_checked_naming_the_field(api_client, store, other_headers):
    prune = _finished(store, PRUNE, [{"genome": {"attn": [1, 0], "mlp": [2, 2]}}])
    running = _finished(store, KV, [], status=JobStatus.running)
    joint = store.create("alpha", parse_spec(_joint([])).model_dump(mode="json")).id
    other_model = _finished(store, {**PRUNE, "model": {"source": "builtin:tiny-llama"}}, [])
    cases = [
        (_joint([prune, "ffffffffffffffff"]), 404, "job_not_found", "joint.seed_jobs.1", None),
        (_joint([prune]), 404, "job_not_found", "joint.seed_jobs.0", other_headers),  # another tenant's
        (_joint([running]), 409, "job_not_finished", "joint.seed_jobs.0", None),
        (_joint([joint]), 422, "not_a_seed_job", "joint.seed_jobs.0", None),
        (_joint([other_model]), 422, "other_model", "joint.seed_jobs.0", None),
    ]
    for body, status, code, field, headers in cases:
        response = api_client.post("/v1/jobs", json=body, headers=headers)
        assert response.status_code == status, response.text
        assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (code, field)
    assert api_client.post("/v1/jobs", json=_joint([prune])).status_code == 201


def test_the_runner_seeds_every_pair_of_the_fronts(store):
    genomes = [{"attn": [1, 0], "mlp": [2, 2]}, {"attn": [2, 2], "mlp": [4, 0]}]
    prune = _finished(store, PRUNE, [{"genome": g} for g in genomes])
    kv = _finished(store, KV, [{"layers": [[8, 8], [8, 8]]}, {"layers": [[2, 2], [4, 4]]}])
    job = JointJob(store, "unused")
    seeds = job._seeds_from_jobs(parse_spec(_joint([prune, kv])), SPACE)
    assert seeds == [JointGenome(g["attn"], g["mlp"], (c,)) for g in genomes for c in (1, 2)]
    # a prune job alone: its genomes at the highest KV pair (16-bit here); a KV job alone: on the dense model
    assert job._seeds_from_jobs(parse_spec(_joint([prune])), SPACE) == [
        JointGenome(g["attn"], g["mlp"], (0,)) for g in genomes]
    assert job._seeds_from_jobs(parse_spec(_joint([kv])), SPACE) == [
        JointGenome((0, 0), (0, 0), (c,)) for c in (1, 2)]
