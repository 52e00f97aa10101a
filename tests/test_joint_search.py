"""The joint space's exact memory and the joint strategies' ask/tell protocol, on toy objectives (no torch), with
and without a third (latency) objective."""

from __future__ import annotations

import json
import random

import pytest

from darwinfront.core.errors import InvalidSpec
from search import joint_search
from search.genome import LevelSpace
from search.joint_space import CacheGeometry, Deployment, JointGenome, JointSpace, kv_choice_for
from search.kv_space import KVGroup, KVSpace
from search.pareto import dominates, non_dominated

LEVELS = LevelSpace(n_layers=4, attn_levels=2, mlp_levels=4, attn_unit_params=1_000, mlp_level_params=300,
                    dense_params=100_000)
KV = KVSpace(groups=(KVGroup((0, 1), ((16, 16), (8, 8), (4, 4), (2, 2))), KVGroup((2, 3), ((16, 16), (8, 4), (4, 2)))),
             num_layers=4)
CACHE = CacheGeometry(kv_heads=2, head_dim=8, heads_per_level=1, mode="per_token", token_group=8, key_group=32,
                      residual=0)
SPACE = JointSpace(LEVELS, KV, CACHE, Deployment(batch=2, context=10, dtype_bytes=2))


def test_memory_known_answers():
    dense16 = SPACE.dense([0, 0])  # every layer 2 heads x 8 channels x 10 tokens x 2 bytes, K and V, batch 2
    assert SPACE.cache_bytes(dense16) == 4 * 2 * (2 * 2 * 10 * 8 * 2)
    assert SPACE.memory(dense16) == 100_000 * 2 + SPACE.cache_bytes(dense16)
    # KV4 on layers 0-1: per token 4 code bytes + fp16 scale and zero (one group of 8 channels)
    g = JointGenome(attn=(0, 1, 2, 0), mlp=(0, 0, 0, 4), kv=(2, 0))
    per_head_kv4 = 10 * (4 + 4)
    layer0 = 2 * 2 * 2 * per_head_kv4  # batch 2, 2 heads, K and V
    layer1 = 2 * 1 * 2 * per_head_kv4  # one K/V head left
    layer2 = 2 * 1 * 2 * (10 * 1 * 2)  # no attention: the (B, 1, T, 1) placeholder, kept at 16 bits
    layer3 = 2 * 2 * 2 * (10 * 8 * 2)
    assert SPACE.cache_bytes(g) == layer0 + layer1 + layer2 + layer3
    assert SPACE.pairs(g) == [(4, 4), (4, 4), (16, 16), (16, 16)]
    assert SPACE.weight_bytes(g) == (100_000 - 3 * 1_000 - 4 * 300) * 2


def test_memory_with_a_residual_window_and_kivi_keys():
    kivi = CacheGeometry(kv_heads=1, head_dim=8, heads_per_level=1, mode="kivi", token_group=8, key_group=4,
                         residual=8)
    space = JointSpace(LEVELS, KV, kivi, Deployment(batch=1, context=20, dtype_bytes=2))
    g = JointGenome(attn=(0,) * 4, mlp=(0,) * 4, kv=(3, 1))  # KV2 on layers 0-1, K8V4 on 2-3
    # KV2 keys: 16 of 20 tokens in 2 blocks of 8 (codes 2 bytes/token, 16/4 groups x 8 channels of fp16 x2),
    # 4 full-precision tokens; values: 12 tokens out of the window (2 bytes + 4 meta each), 8 in it
    k2 = 16 * 2 + 2 * 2 * 4 * 8 + 4 * 8 * 2
    v2 = 12 * (2 + 4) + 8 * 8 * 2
    k8 = 16 * 8 + 2 * 2 * 4 * 8 + 4 * 8 * 2
    v4 = 12 * (4 + 4) + 8 * 8 * 2
    assert space.cache_bytes(g) == 2 * (k2 + v2) + 2 * (k8 + v4)


def test_genome_checks_and_round_trip():
    with pytest.raises(InvalidSpec, match="genome.kv"):
        SPACE.check(JointGenome((0,) * 4, (0,) * 4, (0, 3)))
    assert JointSpace.from_dict(json.loads(json.dumps(SPACE.to_dict()))) == SPACE
    g = JointGenome((1, 0, 0, 2), (4, 3, 0, 0), (1, 2))
    assert JointGenome.from_dict(g.to_dict()) == g
    assert kv_choice_for(KV, [[8, 8], [8, 8], [4, 2], [4, 2]]) == [1, 2]


def toy(genome: JointGenome) -> float:
    """Pruning and low bits both cost; a layer with fewer attention units takes low bits better (the levers
    interact)."""
    prune = sum(a * a for a in genome.attn) + sum(m * m for m in genome.mlp) / 4
    bits = sum(16 / k + 16 / v for k, v in SPACE.pairs(genome)) / (1 + sum(genome.attn))
    return float(prune + bits)


def run(strategy, stop_after=None):
    asked, told = [], 0
    while not strategy.finished:
        batch = strategy.ask()
        assert batch, "not finished, yet nothing to ask"
        asked += batch
        for request in batch:
            if told == stop_after:
                return asked
            strategy.tell(request.candidate_id, toy(request.genome))
            told += 1
    return asked


def build(name, **kw):
    seeds = joint_search.seed_genomes(SPACE, [0.25, 0.5])
    return joint_search.build(name, SPACE, seeds, seed=3, budget=30, round_size=6, **kw)


@pytest.mark.parametrize("name", sorted(joint_search.STRATEGIES))
def test_budget_distinct_genomes_and_the_cap(name):
    dense = SPACE.memory(SPACE.dense([0, 0]))
    cap = int(dense * 0.96)
    strategy = build(name, memory_cap=cap)
    asked = run(strategy)
    assert len(asked) == strategy.evaluations == 30
    assert len({r.genome.key() for r in asked}) == 30
    assert all(SPACE.memory(r.genome) <= cap for r in asked)
    assert strategy.best_fitness == min(toy(r.genome) for r in asked)
    front = strategy.front()
    mems = [SPACE.memory(g) for g in front]
    assert mems == sorted(mems) and [toy(g) for g in front] == sorted((toy(g) for g in front), reverse=True)


@pytest.mark.parametrize("name", sorted(joint_search.STRATEGIES))
def test_same_seed_same_requests_and_resume_equals_uninterrupted(name):
    full = [r.to_dict() for r in run(build(name))]
    assert full == [r.to_dict() for r in run(build(name))]
    first = build(name)
    partial = run(first, stop_after=14)
    resumed = build(name)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = run(resumed)
    assert [r.to_dict() for r in partial[:14]] + [r.to_dict() for r in rest] == full


def test_the_evolution_mixes_level_moves_and_pair_changes():
    asked = run(build("evolution"))
    children = asked[len(joint_search.seed_genomes(SPACE, [0.25, 0.5])):]
    kvs = {r.genome.kv for r in children}
    prunes = {r.genome.prune.key() for r in children}
    assert len(kvs) > 2 and len(prunes) > 3


def test_the_first_round_holds_exactly_the_grid_of_uniform_cuts_and_kv_presets():
    # choices: highest [0, 0], lowest [3, 2], KV8 and K8V4 -> [1, 1] (group 1 has no K8V4, group 2 no KV8: the
    # nearest pairs), KV4, K4V2 -> [2, 2], KV2 -> the lowest again
    assert joint_search.uniform_kv_choices(SPACE) == [[0, 0], [3, 2], [1, 1], [2, 2]]
    grid = [cut(choice) for choice in ([0, 0], [3, 2], [1, 1], [2, 2])
            for cut in (SPACE.dense, lambda c: SPACE.uniform(0.25, c), lambda c: SPACE.uniform(0.5, c))]
    assert joint_search.seed_genomes(SPACE, [0.25, 0.5]) == grid
    first = build("evolution").ask()
    assert [r.genome for r in first] == grid and {r.round for r in first} == {0}
    extra = JointGenome((1, 0, 0, 0), (0,) * 4, (2, 1))
    assert joint_search.seed_genomes(SPACE, [0.25, 0.5], [extra, grid[0]]) == [extra] + grid  # repeats dropped


def test_a_kv_move_steps_one_group_to_a_neighbour_in_its_pair_list():
    rng = random.Random(0)
    assert [joint_search.kv_step(i, 4, rng) for i in (0, 3)] == [1, 2] and joint_search.kv_step(0, 1, rng) == 0
    assert {joint_search.kv_step(1, 4, rng) for _ in range(50)} == {0, 2}
    parent = SPACE.uniform(0.25, [1, 1])
    for seed in range(40):
        child = joint_search.mixed_mutation(parent, SPACE, random.Random(seed), kv_rate=1.0, max_moves=1)
        steps = [abs(c - p) for c, p in zip(child.kv, parent.kv, strict=True)]
        assert sorted(steps) == [0, 1] and child.prune == parent.prune


def test_the_move_rate_follows_the_kind_of_move_that_reaches_the_front():
    none = {"kv": 0, "level": 0}
    assert joint_search.move_rate(0.5, none, none) == 0.5 and joint_search.move_rate(0.3, none, none) == 0.3
    # KV moves 3 of 4 on the front (4/6 smoothed), level moves 0 of 4 (1/6): 0.5 x 4/6 / (0.5 x 5/6) = 0.8
    assert joint_search.move_rate(0.5, {"kv": 3, "level": 0}, {"kv": 4, "level": 4}) == pytest.approx(0.8)
    assert joint_search.move_rate(0.5, {"kv": 0, "level": 40}, {"kv": 40, "level": 40}) == 0.1  # the floor
    strategy = build("evolution")
    run(strategy)
    assert sum(strategy._tries.values()) >= 30 - 12 and strategy.kv_rate != 0.5
    fixed = build("evolution", kv_rate=0.0)
    run(fixed)
    assert fixed.kv_rate == 0.0


def toy_latency(genome: JointGenome) -> float:
    """A measured latency as the search sees it: a fixed value per genome that KL and memory do not predict."""
    return 5.0 + 50.0 * random.Random(genome.key()).random()


def run3(strategy, stop_after=None):
    asked, told = [], 0
    while not strategy.finished:
        batch = strategy.ask()
        asked += batch
        for request in batch:
            if told == stop_after:
                return asked
            strategy.tell(request.candidate_id, toy(request.genome), latency=toy_latency(request.genome))
            told += 1
    return asked


def point3(genome: JointGenome) -> tuple[float, float, float]:
    return toy(genome), float(SPACE.memory(genome)), toy_latency(genome)


@pytest.mark.parametrize("name", sorted(joint_search.STRATEGIES))
def test_a_latency_search_keeps_the_front_of_all_three_objectives(name):
    cap = int(SPACE.memory(SPACE.dense([0, 0])) * 0.98)
    strategy = build(name, memory_cap=cap, latency=True)
    asked = run3(strategy)
    assert len(asked) == strategy.evaluations == 30 and all(SPACE.memory(r.genome) <= cap for r in asked)
    front = strategy.front()
    points = [point3(g) for g in front]
    assert not any(dominates(a, b) for a in points for b in points)  # non-dominated in 3 objectives
    kept = {g.key() for g in front}
    for request in asked:  # and complete: every genome left out is dominated by a front point (or repeats one)
        if request.genome.key() not in kept:
            p = point3(request.genome)
            assert any(dominates(q, p) or q == p for q in points)
    # latency matters: the 3-objective front keeps points the (KL, memory) front drops
    two = {front[i].key() for i in non_dominated([p[:2] for p in points])}
    assert len(kept) > len(two)
    if name == "nsga2":
        assert len(strategy._study.directions) == 3
        assert strategy._study.trials[0].values == list(point3(asked[0].genome))


@pytest.mark.parametrize("name", sorted(joint_search.STRATEGIES))
def test_a_latency_search_resumes_to_the_same_requests_and_refuses_a_kl_without_latency(name):
    full = [r.to_dict() for r in run3(build(name, latency=True))]
    first = build(name, latency=True)
    partial = run3(first, stop_after=14)
    resumed = build(name, latency=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [r.to_dict() for r in partial[:14]] + [r.to_dict() for r in run3(resumed)] == full
    strategy = build(name, latency=True)
    request = strategy.ask()[0]
    with pytest.raises(ValueError, match="latency"):
        strategy.tell(request.candidate_id, 0.5)
    strategy.tell(request.candidate_id, None, "failed")  # a failure has no latency to tell
