"""Prune jobs with the literature's strategies over REST on the embedded stack: `nirvana` gets the criterion's
unit scores through the prepare step, `pagcp` runs its greedy rounds, and both front only genomes at or under
each target's size."""

from __future__ import annotations

import over_http
import pytest

from darwinfront.stack import EmbeddedStack
from search.genome import LevelSpace, PruneGenome
from workers import tracking

pytestmark = pytest.mark.integration

SPEC = {
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "eval_tokens": 256, "seq_len": 64, "database_tokens": 512},
    "prune": {"targets": [0.5], "criterion": "wanda_sp", "training_aware": False},
    "search": {"generations": 2, "offspring": 4},
    "seed": 3,
}


@pytest.mark.parametrize("search", [{"strategy": "nirvana", "gamma": 3.0}, {"strategy": "pagcp"}])
def test_a_literature_strategy_job_fronts_candidates_at_the_target_size(tmp_path, micro_dir, search):
    spec = {**SPEC, "name": search["strategy"], "search": {**SPEC["search"], **search}}
    with EmbeddedStack(tmp_path, port=0) as stack, over_http.client(stack) as http:
        job_id = http.post("/v1/jobs", json=spec).json()["id"]
        job = over_http.wait(http, job_id, over_http.finished)
        assert job["status"] == "succeeded", job
        events = http.get(f"/v1/jobs/{job_id}/events").json()["events"]
        space = LevelSpace.from_dict(next(e["data"]["space"] for e in events if e["kind"] == "prepared"))
        trials = tracking.open_study(stack.redis_url, job_id).get_trials(deepcopy=False)
        front = over_http.front(http, job_id)
    target = space.params(space.uniform(0.5))
    assert 2 <= len(trials) <= 15 and front
    finals = [t for t in trials if t.state.name == "COMPLETE"]
    assert finals and all(space.params(PruneGenome.from_dict(t.user_attrs["genome"])) <= target for t in finals)
    if search["strategy"] == "nirvana":
        assert len(trials) == 2  # the uniform start and the allocation at the given gamma
    else:
        assert any(t.state.name == "PRUNED" for t in trials)  # the greedy steps on the way, off the front
