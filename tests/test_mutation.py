"""Level-switch mutation and offspring: budgets kept, no no-ops, no copies, the paper's switch counts."""

import random
from collections import Counter

import pytest

from darwinfront.core.errors import InvalidSpec
from search.genome import LevelSpace, PruneGenome
from search.mutation import level_switch, neighbourhood, offspring, single_switches, switch_count


def make_space(n_layers=8, attn_levels=4, mlp_levels=4):
    return LevelSpace(
        n_layers=n_layers,
        attn_levels=attn_levels,
        mlp_levels=mlp_levels,
        attn_unit_params=1_000,
        mlp_level_params=300,
        dense_params=10**6,
    )


def changed_positions(a, b):
    return [
        (group, i, y - x)
        for group in ("attn", "mlp")
        for i, (x, y) in enumerate(zip(getattr(a, group), getattr(b, group), strict=True))
        if x != y
    ]


def test_level_switch_keeps_level_sums_and_params():
    space = make_space()
    rng = random.Random(0)
    genome = space.uniform(0.5)
    for _ in range(2_000):
        child = level_switch(genome, space, rng)
        space.check(child)
        assert sum(child.attn) == sum(genome.attn) and sum(child.mlp) == sum(genome.mlp)
        assert space.params(child) == space.params(genome)
        genome = child  # a long random walk reaches the edges of the space too


def test_single_switch_raises_one_layer_and_lowers_another():
    space = make_space()
    rng = random.Random(1)
    parent = PruneGenome(attn=(0, 4, 2, 2, 0, 4, 1, 3), mlp=(4, 4, 4, 4, 0, 0, 0, 0))
    for _ in range(500):
        moves = changed_positions(parent, level_switch(parent, space, rng, max_switches=1))
        assert len(moves) == 2, moves  # never a no-op: the raised and lowered layers differ
        (group_a, _, delta_a), (group_b, _, delta_b) = moves
        assert group_a == group_b and sorted([delta_a, delta_b]) == [-1, 1]


def test_group_is_chosen_in_proportion_to_its_levels():
    space = make_space(attn_levels=2, mlp_levels=6)
    rng = random.Random(2)
    parent = space.uniform(0.5)
    groups = Counter(
        changed_positions(parent, level_switch(parent, space, rng, max_switches=1))[0][0] for _ in range(8_000)
    )
    assert groups["attn"] / 8_000 == pytest.approx(2 / 8, abs=0.02)


def test_a_group_without_legal_switch_falls_back_to_the_other():
    space = make_space(n_layers=4)
    rng = random.Random(3)
    parent = PruneGenome(attn=(0, 0, 0, 0), mlp=(1, 2, 0, 3))
    for _ in range(200):
        child = level_switch(parent, space, rng)
        assert child.attn == parent.attn and sum(child.mlp) == 6


@pytest.mark.parametrize(
    ("space", "genome"),
    [
        (make_space(n_layers=3), PruneGenome(attn=(0, 0, 0), mlp=(0, 0, 0))),
        (make_space(n_layers=2), PruneGenome(attn=(4, 4), mlp=(4, 4))),
        (make_space(n_layers=1), PruneGenome(attn=(2,), mlp=(1,))),
    ],
)
def test_no_legal_switch_at_all_is_an_invalid_spec(space, genome):
    with pytest.raises(InvalidSpec):
        level_switch(genome, space, random.Random(0))


def test_switch_counts_follow_min_of_two_uniforms():
    rng = random.Random(4)
    counts = Counter(switch_count(rng, 3) for _ in range(30_000))
    for n, p in ((1, 5 / 9), (2, 3 / 9), (3, 1 / 9)):
        assert counts[n] / 30_000 == pytest.approx(p, abs=0.012)


def test_mutants_show_the_switch_count_distribution():
    # Each switch moves two level steps, so a mutant made of n switches is 2n steps from its parent unless a
    # later switch undoes part of an earlier one: rare (about 1%) with 100 layers at mid levels.
    space = make_space(n_layers=100, attn_levels=8, mlp_levels=8)
    parent = space.uniform(0.5)
    rng = random.Random(5)
    samples = 5_000
    counts = Counter(
        sum(abs(d) for _, _, d in changed_positions(parent, level_switch(parent, space, rng))) // 2
        for _ in range(samples)
    )
    for n, p in ((1, 5 / 9), (2, 3 / 9), (3, 1 / 9)):
        assert counts[n] / samples == pytest.approx(p, abs=0.025)


def test_offspring_are_distinct_new_and_within_budget():
    space = make_space()
    parent = space.uniform(0.5)
    seen_before = {c.key() for c in offspring(parent, space, random.Random(6), 10, seen=set())}
    children = offspring(parent, space, random.Random(7), 40, seen=seen_before | {parent.key()})
    keys = [c.key() for c in children]
    assert len(children) == 40 and len(set(keys)) == 40
    assert parent.key() not in keys and not seen_before & set(keys)
    assert all(space.params(c) == space.params(parent) for c in children)


def test_offspring_are_a_function_of_the_rng_seed():
    space = make_space()
    parent = space.uniform(0.25)
    first = offspring(parent, space, random.Random(8), 16, seen=set())
    again = offspring(parent, space, random.Random(8), 16, seen=set())
    assert first == again


def test_offspring_of_a_tiny_space_returns_all_that_exist_and_stops():
    space = make_space(n_layers=2, attn_levels=1, mlp_levels=1)
    parent = PruneGenome(attn=(1, 0), mlp=(0, 1))
    # Same level sums: attn (1,0)/(0,1) times mlp (1,0)/(0,1); three besides the parent.
    expected = {"a0.1-m0.1", "a1.0-m1.0", "a0.1-m1.0"}
    assert {c.key() for c in offspring(parent, space, random.Random(9), 10, seen=set())} == expected
    assert [c.key() for c in offspring(parent, space, random.Random(9), 10, seen={"a0.1-m0.1", "a1.0-m1.0"})] == [
        "a0.1-m1.0"
    ]
    assert offspring(parent, space, random.Random(9), 5, seen=expected) == []


def test_offspring_with_a_custom_mutation_stops_after_bounded_attempts():
    space = make_space()
    parent = space.uniform(0.5)
    calls = []

    def copy_parent(genome, space, rng):
        calls.append(1)
        return genome

    assert offspring(parent, space, random.Random(0), 3, seen=set(), mutate=copy_parent) == []
    assert len(calls) == 20 * 3 + 100


def test_single_switches_and_neighbourhood_known_sizes():
    space = make_space(n_layers=3, attn_levels=2, mlp_levels=2)
    genome = PruneGenome(attn=(1, 1, 1), mlp=(0, 0, 2))
    # attn: every ordered pair of distinct layers (6); mlp: raise layer 0 or 1, lower layer 2 (2).
    assert len(list(single_switches(genome, space))) == 8
    # Reachable attn vectors with sum 3 in 0..2: 7, mlp vectors with sum 2: 6; all within 3 switches.
    assert len(neighbourhood(genome, space, 3)) == 7 * 6 - 1
