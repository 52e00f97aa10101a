"""The joint evaluator on builtin:micro-llama: known answers for KL and memory, `load_joint` from a configuration
document giving the model and cache the evaluator scored, and the latency objective timed on the candidate as
applied (the sliced model with its packed cache)."""

from __future__ import annotations

import copy

import pytest

from darwinfront.core.methods import parse_spec
from search.joint_space import JointGenome, JointSpace
from workers import fitness, latency
from workers.joint_evaluator import JointEvaluator, prepare_joint
from workers.joint_load import load_joint
from workers.kv.cache import build_cache

pytestmark = pytest.mark.integration  # the trained micro model, its level database and KV profile

SPEC = parse_spec({
    "method": "joint", "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 256, "eval_tokens": 64, "train_tokens": 0, "database_tokens": 256, "seq_len": 64},
    "prune": {"criterion": "wanda_sp", "levels": 4},
    "kv": {"mode": "per_token", "residual": 0, "profile_sequences": 2},
    "deployment": {"batch_size": 2, "context": 256, "dtype": "float32"}, "seed": 1,
}).model_dump(mode="json")


@pytest.fixture(scope="module")
def evaluator(micro_dir):
    prepared = prepare_joint(SPEC)
    return JointEvaluator(SPEC, prepared)


def _genome(space: JointSpace, attn, mlp, pair) -> JointGenome:
    return JointGenome(attn, mlp, tuple(g.candidates.index(pair) for g in space.kv.groups))


def test_the_dense_model_at_16_bits_scores_zero_and_bits_and_cuts_cost_kl(evaluator):
    space = evaluator.space
    assert all(g.candidates[0] == (16, 16) for g in space.kv.groups)  # kv16: the unquantized pair offered
    dense = _genome(space, (0, 0), (0, 0), (16, 16))
    kv2 = _genome(space, (0, 0), (0, 0), (2, 2)) if all((2, 2) in g.candidates for g in space.kv.groups) else None
    cut = _genome(space, (1, 0), (2, 1), (16, 16))
    replies = {name: evaluator.evaluate({"candidate_id": name, "genome": g.to_dict()})
               for name, g in (("dense", dense), ("kv2", kv2), ("cut", cut)) if g is not None}
    assert replies["dense"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert replies["cut"]["kl"] > 1e-3
    assert replies["dense"]["memory"] == space.memory(dense) > replies["cut"]["memory"] == space.memory(cut)
    assert replies["dense"]["weight_bytes"] == 4 * sum(p.numel() for p in evaluator.inputs.model.parameters())
    if kv2 is not None:
        assert replies["kv2"]["kl"] > 1e-3 and replies["kv2"]["memory"] < replies["dense"]["memory"]


def test_load_joint_from_a_configuration_gives_the_scored_model_and_cache(evaluator):
    space = evaluator.space
    genome = JointGenome((1, 0), (2, 1), tuple(len(g.candidates) - 1 for g in space.kv.groups))
    reply = evaluator.evaluate({"candidate_id": "c", "genome": genome.to_dict()})
    configuration = evaluator.configuration(genome.to_dict(), {"candidate_id": "c", "kl": reply["kl"]})
    assert configuration["memory"]["memory"] == space.memory(genome)
    model, tokenizer, cache = load_joint(configuration, model=copy.deepcopy(evaluator.inputs.model))
    assert tokenizer is None and cache().precision.layers == tuple(space.pairs(genome))
    config = cache().precision
    kl = fitness.kl(model, evaluator.inputs.calibration, evaluator.teacher,
                    cache=lambda: build_cache(model, config, storage="simulated", quantize_in_forward=True))
    assert kl == pytest.approx(reply["kl"], rel=1e-5)  # wanda_sp: the cut of the dense weights is what was scored
    ids = evaluator.inputs.calibration[:1, :8]
    out = model.generate(input_ids=ids, past_key_values=cache(), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)
    with pytest.raises(ValueError, match="configuration.format"):
        load_joint({"format": "other"}, model=evaluator.inputs.model)


LATENCY_SPEC = parse_spec({
    **SPEC, "kv": {"mode": "per_token", "residual": 0, "profile_sequences": 2, "bits": [4]},
    "deployment": {"batch_size": 32, "context": 256, "dtype": "float32",
                   "latency": {"context": 128, "warmup": 3, "repeats": 15}},
}).model_dump(mode="json")


@pytest.fixture(scope="module")
def timed(micro_dir):
    prepared = prepare_joint(LATENCY_SPEC)
    return prepared, JointEvaluator(LATENCY_SPEC, prepared)


def test_latency_is_measured_on_the_applied_candidate_and_a_deep_cut_decodes_faster(timed):
    prepared, evaluator = timed
    space = evaluator.space
    assert prepared["dense_latency_ms"] > 0  # the dense model with a 16-bit cache: the history's scale
    levels = space.levels
    kv4 = tuple(g.candidates.index((4, 4)) for g in space.kv.groups)  # bits [4] and kv16: (16, 16) or (4, 4)
    dense = JointGenome((0, 0), (0, 0), kv4)
    # every attention unit and all but one MLP level gone: the candidate decodes with almost nothing per layer
    cut = JointGenome((levels.attn_levels,) * 2, (levels.mlp_levels - 1,) * 2, kv4)
    replies = {name: evaluator.evaluate({"candidate_id": name, "genome": g.to_dict()})
               for name, g in (("dense", dense), ("cut", cut))}
    assert "error" not in replies["dense"] and "error" not in replies["cut"], replies
    assert replies["dense"]["latency"] > 0 and replies["cut"]["latency"] > 0
    assert replies["cut"]["latency"] < 0.8 * replies["dense"]["latency"]  # medians of 15 steps; the cut is ~3x
    configuration = evaluator.configuration(dense.to_dict(), {"candidate_id": "dense", **replies["dense"]})
    assert configuration["metrics"]["latency"] == replies["dense"]["latency"]
    assert configuration["deployment"]["latency"] == LATENCY_SPEC["deployment"]["latency"]
    assert "latency" not in evaluator.configuration(dense.to_dict(), {"candidate_id": "d", "kl": 0.0})["metrics"]


def test_the_latency_objective_times_the_configured_packed_cache(timed, monkeypatch):
    _, evaluator = timed
    space = evaluator.space
    genome = JointGenome((1, 0), (2, 1), tuple(g.candidates.index((4, 4)) for g in space.kv.groups))
    seen = []

    def spy(model, cache, **kw):
        held = cache()
        seen.append((sum(p.numel() for p in model.parameters()), held.precision.layers, held.layers[0].storage, kw))
        return {"median_ms": 1.5}

    monkeypatch.setattr(latency, "decode_latency", spy)
    reply = evaluator.evaluate({"candidate_id": "c", "genome": genome.to_dict()})
    assert reply["latency"] == 1.5
    (params, pairs, storage, kw), = seen
    assert params == space.levels.params(genome.prune)  # the sliced candidate, not the dense model
    assert pairs == tuple(space.pairs(genome)) and storage == "packed"  # the cache `generate` gets
    assert kw == {"batch_size": 32, "context": 128, "repeats": 15, "warmup": 3}
