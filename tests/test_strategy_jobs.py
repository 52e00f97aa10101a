"""A prune job with `search.strategy: random` over REST on the embedded stack: the evolution's budget, spent on
random genomes at each target's size, and a front that holds each target's best of them."""

from __future__ import annotations

import itertools

import over_http
import pytest

from darwinfront.core.methods import parse_spec
from darwinfront.stack import EmbeddedStack
from search.genome import LevelSpace
from workers import tracking

pytestmark = pytest.mark.integration

SPEC = {
    "name": "random strategy",
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "eval_tokens": 256, "seq_len": 64, "database_tokens": 512},
    "prune": {"targets": [0.3, 0.6], "criterion": "wanda_sp", "training_aware": False},
    "search": {"strategy": "random", "generations": 2, "offspring": 4},
    "seed": 3,
}


def genomes_at(space: LevelSpace, target: float) -> int:
    """How many genomes have the uniform start's level sums at `target` (what a random search can draw)."""
    start = space.uniform(target)

    def count(total: int, top: int) -> int:
        return sum(1 for levels in itertools.product(range(top + 1), repeat=space.n_layers) if sum(levels) == total)

    return count(sum(start.attn), space.attn_levels) * count(sum(start.mlp), space.mlp_levels)


def test_a_random_search_job_spends_the_evolution_budget_and_fronts_each_targets_best(tmp_path, micro_dir):
    planned = parse_spec(SPEC).planned_evaluations()
    assert planned == 2 * (1 + 2 * (4 + 2 + 1))
    with EmbeddedStack(tmp_path, port=0) as stack, over_http.client(stack) as http:
        refused = http.post("/v1/jobs", json={**SPEC, "search": {"strategy": "annealing"}})
        assert refused.status_code == 422 and "strategy" in refused.text and "annealing" in refused.text

        job_id = http.post("/v1/jobs", json=SPEC).json()["id"]
        job = over_http.wait(http, job_id, over_http.finished)
        assert job["status"] == "succeeded", job
        events = http.get(f"/v1/jobs/{job_id}/events").json()["events"]
        space = LevelSpace.from_dict(next(e["data"]["space"] for e in events if e["kind"] == "prepared"))
        # per target the budget (15), or fewer when the target's size holds fewer genomes (a small model)
        per_target = [min(15, genomes_at(space, target)) for target in SPEC["prune"]["targets"]]
        assert job["progress"]["planned"] == planned and job["progress"]["evaluations"] == sum(per_target)
        generations = [e["data"]["generation"] for e in events if e["kind"] == "generation"]
        assert generations[:2] == [0, 1]  # the start, then a round per generation, checkpointed each time

        trials = tracking.open_study(stack.redis_url, job_id).get_trials(deepcopy=False)
        front = over_http.front(http, job_id)

    ids = [t.user_attrs["candidate_id"] for t in trials]
    assert len(ids) == len(set(ids)) == sum(per_target)
    assert sorted(ids) == sorted(f"t{t}-random-c{c}" for t, n in enumerate(per_target) for c in range(n))
    assert all(t.values is not None for t in trials)  # every random candidate is final: a COMPLETE trial
    kl_at = {}
    for trial in trials:
        params, kl = int(trial.values[1]), trial.values[0]
        kl_at.setdefault(params, []).append(kl)
    assert len(kl_at) == 2  # every candidate of a target has the target's parameter count
    assert front, "empty front"
    for candidate_id, params, kl in front:
        assert "-random-c" in candidate_id
        assert kl == min(kl_at[params])  # the front holds each size's best random genome
