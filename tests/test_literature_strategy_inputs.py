"""The runner's side of the literature strategies: unit scores reach `nirvana` through the prepare step, and a
job's search section sets the strategies' options (micro-llama, in process)."""

from __future__ import annotations

import math

import pytest
import torch

from darwinfront.core.methods import parse_spec
from search import strategies
from search.nirvana import UnitSaliency
from workers import criteria
from workers.prune_job import search_plan, stages_for

SPEC = {
    "data": {"calibration_tokens": 256, "train_tokens": 0, "database_tokens": 512, "eval_tokens": 128, "seq_len": 64},
    "prune": {"targets": [0.5], "criterion": "magnitude", "levels": 4, "training_aware": False},
    "search": {"strategy": "nirvana", "gamma": 3.0, "generations": 1, "offspring": 2},
    "seed": 3,
}


def test_search_section_options_reach_the_plan():
    spec = parse_spec({"model": {"source": "builtin:micro-llama"},
                       "search": {"strategy": "pagcp", "layer_order": "reverse", "early_layer_prior": 2.0}})
    plan = search_plan(spec, stages_for(spec, 16))
    assert (plan.layer_order, plan.early_layer_prior, plan.gamma) == ("reverse", 2.0, None)
    with pytest.raises(ValueError, match="gamma"):
        parse_spec({"model": {"source": "builtin:micro-llama"}, "search": {"gamma": 0}})


def test_prepare_hands_nirvana_the_criterion_scores_in_the_database_order(micro_dir, tmp_path, monkeypatch):
    from workers.evaluator import Evaluator
    from workers.prepare import prepare

    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path))
    torch.set_num_threads(1)
    spec = parse_spec({**SPEC, "model": {"source": str(micro_dir), "device": "cpu"}}).model_dump(mode="json")
    prepared = prepare(spec)
    saliency = UnitSaliency.from_dict(prepared["saliency"])
    evaluator = Evaluator(spec, prepared)
    scores = criteria.get("magnitude").score(evaluator.inputs.model, evaluator.inputs.database)
    orders = prepared_orders(prepared)
    for layer, (s, order) in enumerate(zip(scores.layers, orders, strict=True)):
        assert list(saliency.attn[layer]) == pytest.approx([float(s.attn[u]) for u in order["attn"]])
        assert list(saliency.mlp[layer]) == sorted(saliency.mlp[layer])  # removal order: lowest first
    space = evaluator.space
    job = parse_spec(spec)
    search = strategies.build("nirvana", space, space.uniform(0.5), seed=3, key=0,
                              plan=search_plan(job, stages_for(job, prepared["calibration_sequences"])),
                              saliency=saliency)
    while not search.finished:
        for request in search.ask():
            reply = evaluator.evaluate({"candidate_id": request.candidate_id, "genome": request.genome.to_dict(),
                                        "target": 0.5, "generation": 0, "stage": 0, "seed": request.seed,
                                        "sequences": 4, "train_tokens": 0, "final": True})
            search.tell(request.candidate_id, reply.get("kl"), reply.get("error"))
    assert search.evaluations == 2 and math.isfinite(search.best_fitness)


def prepared_orders(prepared: dict) -> list[dict]:
    from workers.database import LevelDatabase

    return list(LevelDatabase.open(prepared["database"]["directory"]).orders)
