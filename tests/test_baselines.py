"""Baselines: uniform draws at a fixed level sum, random search and the uniform-only run, as ask/tell."""

import itertools
import random
from collections import Counter

import pytest

from search.baselines import RandomSearch, UniformOnly, random_genome, random_levels
from search.genome import LevelSpace, PruneGenome
from search.seeding import derive_seed
from search.strategy import Stage

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


def ask_all(search, fitness=lambda request: 1.0, limit=None) -> list:
    """Ask and tell `search` to the end, every request told as soon as it is asked; the requests in ask order."""
    asked = []
    while not search.finished:
        batch = search.ask(limit)
        assert batch, "not finished, yet nothing to ask with nothing pending"
        for request in batch:
            search.tell(request.candidate_id, fitness(request))
        asked += batch
    return asked


def test_random_search_asks_start_then_distinct_same_budget_genomes():
    search = RandomSearch(SPACE, START, seed=3, key=1, budget=40, stage=Stage(1, 64))
    first = search.ask()
    assert len(first) == 1 and search.ask() == []  # the start is a round alone: the rest waits for its result
    search.tell(first[0].candidate_id, 1.0)
    rest = search.ask()
    requests = first + rest
    assert len(requests) == 40 and search.ask() == []
    assert requests[0].genome == START and requests[0].is_parent and not any(r.is_parent for r in rest)
    assert len({r.genome.key() for r in requests}) == 40
    assert {r.seed for r in requests} == {derive_seed(3, 1, "random")} and all(r.final for r in requests)
    assert all(SPACE.params(r.genome) == SPACE.params(START) for r in requests)
    assert [r.candidate_id for r in requests[:2]] == ["t1-random-c0", "t1-random-c1"]


def test_random_search_hands_out_rounds_of_one_generation():
    search = RandomSearch(SPACE, START, seed=3, key=0, budget=1 + 2 * 7, round_size=7)
    sizes = []
    while not search.finished:
        batch = search.ask()
        sizes.append((search.rounds, len(batch), {r.generation for r in batch}))
        for request in batch:
            search.tell(request.candidate_id, 1.0)
    assert sizes == [(0, 1, {0}), (1, 7, {1}), (2, 7, {2})] and search.rounds == 3


def test_random_search_is_deterministic_and_independent_of_ask_sizes():
    one = RandomSearch(SPACE, START, seed=4, key=0, budget=12, round_size=5)
    other = RandomSearch(SPACE, START, seed=4, key=0, budget=12, round_size=5)
    assert ask_all(one) == ask_all(other, limit=3)


def test_random_search_keeps_the_lowest_fitness_and_finishes():
    search = RandomSearch(SPACE, START, seed=5, key=0, budget=10)
    requests = search.ask()
    search.tell(requests[0].candidate_id, float(sum(START.attn[:3])))
    requests += search.ask()
    fitness = {r.candidate_id: float(sum(r.genome.attn[:3])) for r in requests}
    fitness[requests[4].candidate_id] = None
    for request in reversed(requests[1:]):
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
    assert len(ask_all(search)) == 4 and search.finished  # all genomes with these level sums


def test_uniform_only_scores_the_start_once():
    baseline = UniformOnly(SPACE, START, seed=6, key=2)
    (request,) = baseline.ask()
    assert request.genome == START and baseline.ask() == [] and baseline.best_fitness is None
    baseline.tell(request.candidate_id, 0.75)
    assert baseline.finished and baseline.best == START and baseline.best_fitness == 0.75
