"""The joint memory objective is what a deployment really holds: the sliced model's parameters plus the bytes of
the packed mixed-precision cache after `batch` x `context` tokens, measured on a tiny sliced model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model, unit_space

from darwinfront.core.methods import parse_spec
from search.joint_space import Deployment, JointGenome, JointSpace
from search.kv_space import KVGroup, KVSpace
from workers import levels, slicing
from workers.joint_evaluator import cache_geometry, precision
from workers.kv.cache import build_cache


def _spec(kv: dict):
    return parse_spec({"method": "joint", "model": {"source": "builtin:micro-llama"}, "kv": kv})


@pytest.mark.parametrize(("dtype", "kv", "unit"), [
    (torch.float32, {"mode": "per_token", "residual": 8}, "kv_group"),
    (torch.bfloat16, {"mode": "per_token", "residual": 8}, "kv_group"),
    (torch.float32, {"mode": "kivi", "group_size": 4, "residual": 16}, "kv_group"),
    (torch.bfloat16, {"mode": "kivi", "group_size": 4, "residual": 16}, "kv_group"),
    (torch.bfloat16, {"mode": "kivi", "group_size": 4, "residual": 16}, "q_head"),  # K/V heads kept until the top
])
def test_memory_objective_equals_the_measured_bytes(dtype, kv, unit):
    dense = tiny_model("llama_gqa").to(dtype)  # 3 layers, 4 query heads on 2 KV heads of head_dim 8, MLP 48
    levels_space = unit_space(dense, mlp_step=12, attention_unit=unit)
    units = 2 if unit == "kv_group" else 4
    table = levels.LevelTable(units, 1, 48, 12, unit)
    spec = _spec(kv)
    batch, context = 2, 40
    kv_space = KVSpace(groups=(KVGroup((0,), ((4, 4),)), KVGroup((1, 2), ((8, 2), (2, 2)))), num_layers=3)
    space = JointSpace(levels_space, kv_space, cache_geometry(dense, spec, table),
                       Deployment(batch, context, dense.dtype.itemsize))
    # layer 1: one unit cut (one K/V head less under kv_group), layer 2: no attention
    genome = JointGenome(attn=(0, 1, units), mlp=(0, 2, 4), kv=(0, 1))
    orders = [{"attn": list(range(units))[::-1], "mlp": list(range(48))[::-1]} for _ in range(3)]
    model = slicing.slice_model(copy.deepcopy(dense), levels.layout(genome.prune, orders, table))
    cache = build_cache(model, precision(spec, space.pairs(genome)), storage="packed")
    ids = torch.randint(96, (batch, context))
    with torch.inference_mode():
        out = model(input_ids=ids[:, :-3], past_key_values=cache, use_cache=True)
        for t in range(context - 3, context):  # decode the last tokens one by one
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
    assert cache.get_seq_length() == context
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    measured = weights + cache.nbytes()
    assert space.weight_bytes(genome) == weights
    assert abs(space.memory(genome) - measured) <= 0.01 * measured
    assert space.cache_bytes(genome) == cache.nbytes()  # exact, not just within 1 %
