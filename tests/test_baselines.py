"""Baselines: uniform draws at a fixed level sum, random search and the uniform-only run, as ask/tell."""

import itertools
import random
from collections import Counter

import pytest

from search.baselines import RandomSearch, UniformOnly, random_genome, random_levels
from search.evolution import Stage
from search.genome import LevelSpace, PruneGenome
from search.seeding import derive_seed

SPACE = LevelSpace(
    n_layers=6, attn_levels=4, mlp_levels=3, attn_unit_params=1_000, mlp_level_params=300, dense_params=10**6
)
START = SPACE.uniform(0.5)


def test_random_levels_are_uniform_over_all_compositions():
    rng = random.Random(0)
    draws = Counter(random_levels(3, 3, 2, rng) for _ in range(14_000))
    # Three levels in 0..2 summing to 3: the six orders of (0, 1, 2) and (1, 1, 1).
    assert set(draws) == set(itertools.permutations((0, 1, 2))) | {(1, 1, 1)}
    for count in draws.values():
        assert count / 14_000 == pytest.approx(1 / 7, abs=0.015)


def test_random_levels_edges():
    rng = random.Random(1)
    assert random_levels(0, 4, 3, rng) == (0, 0, 0, 0)
    assert random_levels(12, 4, 3, rng) == (3, 3, 3, 3)
    big = random_levels(1_600, 320, 10, rng)  # counts far beyond float range stay exact
    assert sum(big) == 1_600 and all(0 <= x <= 10 for x in big)
    with pytest.raises(ValueError):
        random_levels(13, 4, 3, rng)


def test_random_genome_keeps_the_parameter_count():
    rng = random.Random(2)
    for _ in range(200):
        genome = random_genome(SPACE, START, rng)
        assert SPACE.params(genome) == SPACE.params(START)


def test_random_search_asks_start_then_distinct_same_budget_genomes():
    search = RandomSearch(SPACE, START, seed=3, key=1, budget=40, stage=Stage(1, 64))
    first = search.ask(1)
    rest = search.ask()
    requests = first + rest
    assert len(requests) == 40 and search.ask() == []
    assert requests[0].genome == START and requests[0].is_parent and not any(r.is_parent for r in rest)
    assert len({r.genome.key() for r in requests}) == 40
    assert {r.seed for r in requests} == {derive_seed(3, 1, "random")}
    assert all(SPACE.params(r.genome) == SPACE.params(START) for r in requests)
    assert [r.candidate_id for r in requests[:2]] == ["t1-random-c0", "t1-random-c1"]


def test_random_search_is_deterministic_and_independent_of_ask_sizes():
    one = RandomSearch(SPACE, START, seed=4, key=0, budget=12)
    other = RandomSearch(SPACE, START, seed=4, key=0, budget=12)
    assert one.ask() == other.ask(5) + other.ask(3) + other.ask(100)


def test_random_search_keeps_the_lowest_fitness_and_finishes():
    search = RandomSearch(SPACE, START, seed=5, key=0, budget=10)
    requests = search.ask()
    fitness = {r.candidate_id: float(sum(r.genome.attn[:3])) for r in requests}
    fitness[requests[4].candidate_id] = None
    for request in reversed(requests):
        assert not search.finished
        search.tell(request.candidate_id, fitness[request.candidate_id])
    best = min(v for v in fitness.values() if v is not None)
    first_best = next(r for r in requests if fitness[r.candidate_id] == best)
    assert search.finished and search.evaluations == 10
    assert search.best_fitness == best and search.best == first_best.genome
    with pytest.raises(ValueError):
        search.tell(requests[0].candidate_id, 0.0)
    with pytest.raises(ValueError):
        search.tell("t0-random-c99", 0.0)


def test_random_search_stops_when_the_space_is_used_up():
    tiny = LevelSpace(
        n_layers=2, attn_levels=1, mlp_levels=1, attn_unit_params=10, mlp_level_params=5, dense_params=100
    )
    search = RandomSearch(tiny, PruneGenome(attn=(1, 0), mlp=(0, 1)), seed=0, key=0, budget=10)
    requests = search.ask()
    assert len(requests) == 4  # all genomes with these level sums
    for request in requests:
        search.tell(request.candidate_id, 1.0)
    assert search.finished


def test_uniform_only_scores_the_start_once():
    baseline = UniformOnly(SPACE, START, seed=6, key=2)
    (request,) = baseline.ask()
    assert request.genome == START and baseline.ask() == [] and baseline.best_fitness is None
    baseline.tell(request.candidate_id, 0.75)
    assert baseline.finished and baseline.best == START and baseline.best_fitness == 0.75
