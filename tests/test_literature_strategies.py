"""Known answers of the literature's strategies: PAGCP's greedy pass, NIRVANA's allocation, HierarchicalPrune's
block removal and early-layer protection prior (pure search: toy fitnesses, no torch)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from search import strategies
from search.depth import BlockRemoval, removal_genome
from search.genome import LevelSpace, PruneGenome
from search.mutation import early_layer_protection, layer_prior, level_switch
from search.nirvana import (
    GAMMAS,
    NirvanaAllocation,
    UnitSaliency,
    allocate,
    lowest_prefixes,
    snap,
    sparsities,
    top_up,
)
from search.pagcp import GreedyLayerwise, committed_level, grid
from search.strategy import Stage


def drive(strategy, fitness) -> list:
    """Ask and tell to the end; the requests in ask order."""
    asked = []
    while not strategy.finished:
        batch = strategy.ask()
        assert batch
        for request in batch:
            strategy.tell(request.candidate_id, fitness(request.genome))
        asked += batch
    return asked


# ---- PAGCP ---------------------------------------------------------------------------------------------------

SMALL = LevelSpace(n_layers=3, attn_levels=2, mlp_levels=2, attn_unit_params=100, mlp_level_params=50,
                   dense_params=10_000)
ATTN_COST, MLP_COST = (1.0, 10.0, 1.0), (10.0, 1.0, 1.0)  # KL per level of each layer's attention / MLP


def additive(genome: PruneGenome) -> float:
    attn = sum(c * a for c, a in zip(ATTN_COST, genome.attn, strict=True))
    return attn + sum(c * m for c, m in zip(MLP_COST, genome.mlp, strict=True))


@pytest.mark.parametrize(("order", "expected"), [
    # budget 24 (the uniform cut's KL), shared over 6 units: L0 attn takes 2 levels (allowance 4), L0 MLP none
    # (10 > 4.4), L1 attn none (10 > 5.5), L1 MLP 2, L2 attn and MLP one each, where both level sums are reached
    ("forward", PruneGenome(attn=(2, 0, 1), mlp=(0, 2, 1))),
    # the last layer first: L2 takes 2 + 2, L1 attn none, L1 MLP 1 (the MLP sum reached), L0 attn 1
    ("reverse", PruneGenome(attn=(1, 0, 2), mlp=(0, 1, 2))),
])
def test_pagcp_prunes_each_layer_as_far_as_the_shared_budget_allows_in_order(order, expected):
    start = SMALL.uniform(0.5)
    assert (start, additive(start)) == (PruneGenome(attn=(1, 1, 1), mlp=(1, 1, 1)), 24.0)
    search = GreedyLayerwise(SMALL, start, seed=0, key=0, budget=100, order=order)
    asked = drive(search, additive)
    assert search.best == expected and search.best_fitness == additive(expected) == 6.0
    assert [r.genome for r in asked if r.final] == [start, expected]  # only the start and the end are at size
    assert all(SMALL.params(r.genome) > SMALL.params(start) for r in asked if not r.final)
    # every unit's grid is every level up to what its group still needs: the start, then 2 + 2 + 1 + 2 + 1 + 1
    # forward, 2 + 2 + 1 + 1 + 1 reverse
    assert search.evaluations == (10 if order == "forward" else 8)


def test_pagcp_with_no_budget_to_spend_falls_back_to_the_least_pruned_fill():
    start = SMALL.uniform(0.5)
    search = GreedyLayerwise(SMALL, start, seed=0, key=0, budget=100, loss_budget=0.01)
    asked = drive(search, additive)
    # no level is within 0.04 of the KL: nothing is committed (each unit's grid is both its levels), and the
    # fill spreads the levels one per layer, which is the start again (not scored twice)
    assert search.best == start and search.evaluations == len(asked) == 1 + 6 * 2


def test_pagcp_thins_its_grids_to_the_evaluation_budget():
    assert grid(4, 8) == [1, 2, 3, 4] and grid(4, 2) == [2, 4] and grid(8, 3) == [3, 6, 8] and grid(0, 3) == []
    assert committed_level([1, 2, 3], [0.1, 0.5, 0.2], 0.3) == 1  # the first over the threshold stops the raise
    assert committed_level([1, 2], [None, 0.0], 1.0) == 0  # a failure counts as over
    space = LevelSpace(n_layers=6, attn_levels=8, mlp_levels=8, attn_unit_params=10, mlp_level_params=10,
                       dense_params=10_000)
    search = GreedyLayerwise(space, space.uniform(0.5), seed=0, key=0, budget=20)
    asked = drive(search, lambda g: sum(g.attn) + 2 * sum(g.mlp) + 1.0)
    assert len(asked) <= 20 and asked[-1].final
    assert sum(asked[-1].genome.attn) == sum(space.uniform(0.5).attn)


# ---- NIRVANA -------------------------------------------------------------------------------------------------

# 2 layers; 4 KV groups of 100 parameters (one per level); MLP 64 channels of 1 parameter, 4 per level (16 levels)
NSPACE = LevelSpace(n_layers=2, attn_levels=4, mlp_levels=16, attn_unit_params=100, mlp_level_params=4,
                    dense_params=100_000)
PLANTED = UnitSaliency(attn=[[1, 2, 3, 4], [10, 20, 30, 40]], mlp=[list(range(64)), [c + 6 for c in range(64)]],
                       attn_step=1, mlp_step=4)


def test_nirvana_balance_splits_the_budget_by_gamma():
    removed = NSPACE.dense_params - NSPACE.params(NSPACE.uniform(0.5))
    assert removed == 4 * 100 + 16 * 4
    s_attn, s_mlp = sparsities(NSPACE, PLANTED, removed, 2.0, (0.75, 1.0))
    assert s_mlp == pytest.approx(2.0 * s_attn)
    assert s_attn * 8 * 100 + s_mlp * 128 * 1 == pytest.approx(removed)
    # the MLP at its cap: the attention takes the rest
    s_attn, s_mlp = sparsities(NSPACE, PLANTED, removed, 100.0, (0.75, 0.5))
    assert s_mlp == 0.5 and s_attn * 800 + 64 == pytest.approx(removed)


def test_nirvana_allocation_on_planted_scores():
    # γ = 2: s = 464 / (800 + 2 * 128) = 0.439, so round(3.5) = 4 KV groups and round(112.5) = 112 channels go.
    # Layer 0's groups score lowest, but one stays: 3 from layer 0, 1 from layer 1. The 112 lowest channels are
    # 59 of layer 0 and 53 of layer 1; rounded to cuts that leave widths in multiples of 8 (2 levels of 4),
    # with the largest remainder (53 / 8 = 6.6) taking the 14th block: 56 channels each.
    genome = allocate(NSPACE, PLANTED, 464, 2.0)
    assert genome == PruneGenome(attn=(3, 1), mlp=(14, 14))
    assert lowest_prefixes(PLANTED.mlp, 112, [64, 64]) == [59, 53]
    target = NSPACE.params(NSPACE.uniform(0.5))
    for gamma in GAMMAS:
        assert target - 100 <= NSPACE.params(allocate(NSPACE, PLANTED, 464, gamma)) <= target  # topped up
        widths = [64 - 4 * m for m in allocate(NSPACE, PLANTED, 464, gamma).mlp]
        assert all(w % 8 == 0 for w in widths), (gamma, widths)
        assert all(a <= 3 for a in allocate(NSPACE, PLANTED, 464, gamma).attn)  # one KV group stays
    assert snap([3, 1], 1, 3) == [3, 1] and snap([5, 5, 2], 4, 1) == [1, 1, 1]
    # short of the budget by one channel: the MLP block of 8 (2 levels) whose channels score lowest is added
    short = PruneGenome(attn=(3, 1), mlp=(14, 12))
    assert top_up(NSPACE, PLANTED, short, NSPACE.dense_params - NSPACE.params(short) + 1,
                  {"attn": (1, 3), "mlp": (2, 16)}) == PruneGenome(attn=(3, 1), mlp=(14, 14))


def test_nirvana_scores_the_start_then_its_allocations():
    start = NSPACE.uniform(0.5)
    fitness = lambda g: float(sum(g.attn)) + 0.01 * sum(g.mlp)  # noqa: E731
    given = NirvanaAllocation(NSPACE, start, seed=0, key=0, budget=50, saliency=PLANTED, gamma=2.0)
    asked = drive(given, fitness)
    assert [r.genome for r in asked] == [start, PruneGenome(attn=(3, 1), mlp=(14, 14))] and all(r.final for r in asked)
    searched = NirvanaAllocation(NSPACE, start, seed=0, key=0, budget=50, saliency=PLANTED)
    asked = drive(searched, fitness)
    distinct = {allocate(NSPACE, PLANTED, 464, g) for g in GAMMAS} - {start}
    assert {r.genome for r in asked[1:]} == distinct and len(asked) == 1 + len(distinct)
    assert searched.best_fitness == min(fitness(r.genome) for r in asked)
    with pytest.raises(ValueError, match="unit scores"):
        NirvanaAllocation(NSPACE, start, seed=0, key=0, budget=5, saliency=None)
    with pytest.raises(ValueError, match="do not fit"):
        NirvanaAllocation(NSPACE, start, seed=0, key=0, budget=5,
                          saliency=UnitSaliency(attn=[[1.0]], mlp=[[1.0]], attn_step=1, mlp_step=1))


# ---- HierarchicalPrune ---------------------------------------------------------------------------------------

DSPACE = LevelSpace(n_layers=4, attn_levels=2, mlp_levels=2, attn_unit_params=100, mlp_level_params=100,
                    dense_params=10_000)


def block_cost(attn_costs, mlp_costs):
    """KL: a removed block costs its planted price, a partial level twice it (so the uniform start loses)."""
    def fitness(genome: PruneGenome) -> float:
        total = 0.0
        for costs, levels in ((attn_costs, genome.attn), (mlp_costs, genome.mlp)):
            total += sum(c if level == 2 else 2 * c * level for c, level in zip(costs, levels, strict=True))
        return total
    return fitness


def test_block_removal_keeps_the_later_blocks_first_prior_when_the_data_agree():
    start = DSPACE.uniform(0.5)  # 4 levels per group: 2 whole blocks each
    search = BlockRemoval(DSPACE, start, seed=0, key=0, budget=50)
    asked = drive(search, block_cost((4, 3, 2, 1), (4, 3, 2, 1)))
    prior = PruneGenome(attn=(0, 0, 2, 2), mlp=(0, 0, 2, 2))
    assert search.best == prior and [r.genome for r in asked if r.final] == [start, prior]  # data agree: one final
    assert len(asked) == 1 + 8 + 1 and not any(r.final for r in asked[1:9])


def test_block_removal_follows_the_data_when_they_say_otherwise():
    start = DSPACE.uniform(0.5)
    search = BlockRemoval(DSPACE, start, seed=0, key=0, budget=50)
    asked = drive(search, block_cost((1, 2, 3, 4), (3, 1, 4, 2)))
    data = PruneGenome(attn=(2, 2, 0, 0), mlp=(0, 2, 0, 2))
    finals = [r.genome for r in asked if r.final]
    assert finals == [start, PruneGenome(attn=(0, 0, 2, 2), mlp=(0, 0, 2, 2)), data] and search.best == data


def test_block_removal_spreads_the_left_over_levels_and_ablates_later_blocks_first_on_a_small_budget():
    start = DSPACE.uniform(0.4)  # 3 levels per group: one whole block and one level
    later_first = [3, 2, 1, 0]
    assert removal_genome(DSPACE, start, {"attn": later_first, "mlp": later_first}) == PruneGenome(
        attn=(0, 0, 1, 2), mlp=(0, 0, 1, 2))
    search = BlockRemoval(DSPACE, start, seed=0, key=0, budget=6)
    asked = drive(search, block_cost((1, 1, 1, 1), (1, 1, 1, 1)))
    ablated = [r.genome for r in asked[1:4]]
    assert ablated == [PruneGenome(attn=(0, 0, 0, 2), mlp=(0,) * 4), PruneGenome(attn=(0,) * 4, mlp=(0, 0, 0, 2)),
                       PruneGenome(attn=(0, 0, 2, 0), mlp=(0,) * 4)]
    assert len(asked) <= 6


def test_early_layer_protection_prior_weights_the_switches():
    weights = layer_prior(5, math.log(4))
    assert weights == pytest.approx([1, 2**0.5, 2, 2**1.5, 4]) and layer_prior(3, 0) == [1, 1, 1]
    space = LevelSpace(n_layers=5, attn_levels=4, mlp_levels=4, attn_unit_params=1, mlp_level_params=1,
                       dense_params=1_000)
    parent = PruneGenome(attn=(2,) * 5, mlp=(2,) * 5)  # every layer may go up or down
    rng, ups, downs, n = random.Random(0), Counter(), Counter(), 40_000
    for _ in range(n):
        child = level_switch(parent, space, rng, max_switches=1, prior=weights)
        diff = [c - p for c, p in zip(child.attn + child.mlp, parent.attn + parent.mlp, strict=True)]
        ups[diff.index(1) % 5] += 1
        downs[diff.index(-1) % 5] += 1
    total = sum(weights)
    # P(up = i) = w_i / sum(w); P(down = j) = sum_i P(up = i) (1 / w_j) / sum_{k != i} 1 / w_k
    for i in range(5):
        assert ups[i] / n == pytest.approx(weights[i] / total, abs=0.01)
        p_down = sum(weights[u] / total * (1 / weights[i]) / sum(1 / weights[k] for k in range(5) if k != u)
                     for u in range(5) if u != i)
        assert downs[i] / n == pytest.approx(p_down, abs=0.01)
    assert early_layer_protection(0.0) is level_switch  # strength 0 is the plain switch, draw for draw
    plain = strategies.Plan(3, 8, (Stage(1, 64),))
    protected = strategies.Plan(3, 8, (Stage(1, 64),), early_layer_prior=3.0)
    first = [strategies.build("evolution", space, space.uniform(0.5), seed=1, key=0, plan=p)
             for p in (plain, protected)]
    for search in first:
        search.tell(search.ask()[0].candidate_id, 1.0)
    assert [r.genome for r in first[0].ask()] != [r.genome for r in first[1].ask()]
