"""Baselines over the same level space and the same ask/tell interface as `Evolution`.

`RandomSearch` scores the start and then random genomes with the start's level sums (the same parameter
count), drawn uniformly from all such genomes; `UniformOnly` scores the start alone. Every candidate is
scored on one stage's settings with one shared seed, so their fitnesses compare like the last stage of an
evolution's, and every one is final (it may enter the front). Checkpoints replay the asks and tells.
"""

from __future__ import annotations

import random
from functools import lru_cache
from itertools import accumulate

from search.evolution import DEFAULT_STAGES
from search.genome import LevelSpace, PruneGenome
from search.replay import Replayed, Rounds
from search.seeding import derive_seed
from search.strategy import BestSoFar, Request, Stage, told_index

# Draws of an already-seen genome in a row after which a random search counts its space as used up.
_MAX_REPEATS = 200


def random_levels(total: int, n: int, top: int, rng: random.Random) -> tuple[int, ...]:
    """Uniformly one of all tuples of `n` levels in 0..`top` that sum to `total`.

    Raises:
        ValueError: no such tuple exists.
    """
    if not 0 <= total <= n * top:
        raise ValueError(f"no {n} levels in 0..{top} sum to {total}")
    counts = _compositions(n, top, total)
    levels = []
    for position in range(n):
        rest = counts[n - position - 1]  # ways to fill the layers after this one
        draw = rng.randrange(counts[n - position][total])  # exact integers: the counts outgrow floats
        level = 0
        while draw >= rest[total - level]:
            draw -= rest[total - level]
            level += 1
        levels.append(level)
        total -= level
    return tuple(levels)


@lru_cache(maxsize=8)
def _compositions(n: int, top: int, total: int) -> tuple[tuple[int, ...], ...]:
    """`rows[k][s]`: tuples of k levels in 0..`top` summing to s, for k <= n and s <= total."""
    rows = [(1,) + (0,) * total]
    for _ in range(n):
        prefix = [0, *accumulate(rows[-1])]  # prefix[s + 1] = sum of the previous row up to s
        rows.append(tuple(prefix[s + 1] - prefix[max(0, s - top)] for s in range(total + 1)))
    return tuple(rows)


def random_genome(space: LevelSpace, like: PruneGenome, rng: random.Random) -> PruneGenome:
    """A uniformly random genome with the attention and MLP level sums of `like` (so the same parameters)."""
    space.check(like)
    attn = random_levels(sum(like.attn), space.n_layers, space.attn_levels, rng)
    mlp = random_levels(sum(like.mlp), space.n_layers, space.mlp_levels, rng)
    return PruneGenome(attn=attn, mlp=mlp)


class RandomSearch(Replayed):
    """Random search at a fixed parameter count, as ask/tell.

    The first request is `start` (marked `is_parent`); the others are distinct uniformly random genomes with
    its level sums, `budget` requests in all, fewer when the space holds fewer (after 200 repeated draws in a
    row the space counts as used up). They are handed out in rounds: the start alone, then `round_size` at a
    time (default: all the rest), each round once the one before is told. The best is the lowest fitness, the
    earliest request on ties.

    Args:
        space: the level space.
        start: the first candidate, and the level sums of all others.
        seed: the job seed.
        key: what tells this run from the job's other runs; part of ids and seeds.
        budget: evaluations to run.
        round_size: requests per round after the start's.
        stage: the settings every candidate is scored with (default: the last default evolution stage).
    """

    name = "random"

    def __init__(
        self,
        space: LevelSpace,
        start: PruneGenome,
        *,
        seed: int,
        key: int | str,
        budget: int,
        round_size: int | None = None,
        stage: Stage = DEFAULT_STAGES[-1],
    ):
        super().__init__()
        space.check(start)
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        self._space, self._start, self._key, self._stage = space, start, key, stage
        self._rounds = Rounds(budget, round_size or max(1, budget - 1))
        self._shared_seed = derive_seed(seed, key, self.name)
        self._rng = random.Random(derive_seed(seed, key, self.name, "genomes"))
        self._seen = {start.key()}
        self._requests: list[Request] = [self._request(0, start)]
        self._given = 0
        self._exhausted = False
        self._results: dict[str, float | None] = {}
        self._best = BestSoFar(start)

    def _request(self, index: int, genome: PruneGenome) -> Request:
        cid = f"t{self._key}-{self.name}-c{index}"
        return Request(cid, genome, self._rounds.current, 0, index == 0, self._shared_seed,
                       self._stage, True)

    def _draw(self) -> bool:
        """Append one unseen genome to the requests; False when the space seems used up."""
        for _ in range(_MAX_REPEATS):
            genome = random_genome(self._space, self._start, self._rng)
            if genome.key() not in self._seen:
                self._seen.add(genome.key())
                self._requests.append(self._request(len(self._requests), genome))
                return True
        self._exhausted = True
        return False

    def _ask(self, limit: int | None) -> list[Request]:
        room = self._rounds.room(self._given, len(self._results))
        want = room if limit is None else min(limit, room)
        while len(self._requests) < self._given + want and not self._exhausted and self._draw():
            pass
        fresh = self._requests[self._given : self._given + want]
        self._given += len(fresh)
        return fresh

    def _tell(self, candidate_id: str, fitness: float | None, error: str | None) -> None:
        index = told_index(self._requests, self._given, self._results, candidate_id)
        self._results[candidate_id] = fitness
        self._best.offer(fitness, index, self._requests[index].genome)

    @property
    def finished(self) -> bool:
        """Every request told, and no more to make (budget spent or space used up)."""
        done_asking = self._given >= self._rounds.budget or (self._exhausted and self._given == len(self._requests))
        return done_asking and len(self._results) == self._given

    @property
    def evaluations(self) -> int:
        return len(self._results)

    @property
    def rounds(self) -> int:
        return self._rounds.completed(self._given, len(self._results), ended=self.finished)

    @property
    def best(self) -> PruneGenome:
        """The best genome so far (`start` until something succeeded)."""
        return self._best.candidate

    @property
    def best_fitness(self) -> float | None:
        return self._best.fitness


class UniformOnly(RandomSearch):
    """Scores the start genome (the uniform cut) once: the baseline every search must beat."""

    name = "uniform"

    def __init__(
        self, space: LevelSpace, start: PruneGenome, *, seed: int, key: int | str, stage: Stage = DEFAULT_STAGES[-1]
    ):
        super().__init__(space, start, seed=seed, key=key, budget=1, stage=stage)
