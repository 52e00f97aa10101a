"""The Ray evaluator pool on a real local Ray: same results as scoring in-process, and survival of a killed worker."""

from __future__ import annotations

import os
import signal

import pytest
import ray

from darwinfront.core.methods import parse_spec
from search.genome import LevelSpace
from workers.evaluator import Evaluator
from workers.pool import EvaluatorPool, init_ray
from workers.prepare import prepare

pytestmark = pytest.mark.integration

SPEC = parse_spec(
    {
        "model": {"source": "builtin:micro-llama", "device": "cpu"},
        "data": {"calibration_tokens": 512, "eval_tokens": 256, "seq_len": 64, "database_tokens": 512},
        "prune": {"targets": [0.5], "criterion": "wanda_sp", "training_aware": False},
        "seed": 1,
    }
).model_dump(mode="json")


@pytest.fixture(scope="module")
def prepared(micro_dir):
    return prepare(SPEC)


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _requests(prepared: dict, n: int) -> list[dict]:
    space = LevelSpace.from_dict(prepared["space"])
    start = space.uniform(0.5)
    genomes = [start]
    for i in range(1, n):  # move one MLP level between the two layers, a different amount each time
        shift = min(i, start.mlp[1])
        genomes.append(type(start)(attn=start.attn, mlp=(start.mlp[0] + shift, start.mlp[1] - shift)))
    return [
        {"candidate_id": f"c{i}", "genome": g.to_dict(), "target": 0.5, "generation": 1, "stage": 0,
         "seed": 7, "sequences": 4, "final": i == 0}
        for i, g in enumerate(genomes)
    ]


def test_pool_matches_in_process_scoring(local_ray, prepared):
    requests = _requests(prepared, 4)
    direct = Evaluator(SPEC, prepared)
    expected = {r["candidate_id"]: direct.evaluate(r)["kl"] for r in requests}
    pool = EvaluatorPool(SPEC, prepared, size=2)
    try:
        got = {req["candidate_id"]: reply["kl"] for req, reply in pool.map_unordered(requests)}
    finally:
        pool.shutdown()
    assert got == pytest.approx(expected, abs=1e-6)
    assert len(set(expected.values())) > 1  # the candidates really differ


def test_killed_evaluator_is_replaced_and_its_request_retried(local_ray, prepared):
    requests = _requests(prepared, 6)
    pool = EvaluatorPool(SPEC, prepared, size=2)
    try:
        pid = ray.get(pool.actors[0].__ray_call__.remote(lambda self: os.getpid()))
        results = pool.map_unordered(requests)
        first = [next(results)]
        os.kill(pid, signal.SIGKILL)
        replies = first + list(results)
    finally:
        pool.shutdown()
    assert sorted(req["candidate_id"] for req, _ in replies) == sorted(r["candidate_id"] for r in requests)
    assert all("error" not in reply for _, reply in replies)
    assert pool.lost == 1
