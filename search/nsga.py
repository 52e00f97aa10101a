"""Optuna's NSGA-II over the same level space, at a fixed parameter count, as ask/tell (a benchmark baseline).

Optuna proposes one integer level per layer and group; the proposal is repaired to the start genome's level
sums (random single-level moves, seeded by the trial), so every candidate has exactly the budget's parameters,
like the evolution's. The sampler learns from the repaired genome's fitness (no write-back of the repair). A
repaired genome seen before is told its earlier fitness without a new evaluation, so the budget counts
distinct evaluations, as the evolution's does. Checkpoints replay the asks and tells, so the sampler's random
state is restored too.
"""

from __future__ import annotations

import random

import optuna
from optuna.samplers import NSGAIISampler

from search.evolution import DEFAULT_STAGES
from search.genome import LevelSpace, PruneGenome
from search.replay import Replayed, Rounds
from search.seeding import derive_seed
from search.strategy import BestSoFar, Request, Stage

_MAX_REPEATS = 200


def repair(levels: list[int], total: int, top: int, rng: random.Random) -> tuple[int, ...]:
    """Move single levels of random layers until `levels` (each in 0..`top`) sum to `total`."""
    if not 0 <= total <= len(levels) * top:
        raise ValueError(f"no {len(levels)} levels in 0..{top} sum to {total}")
    levels = list(levels)
    while sum(levels) > total:
        levels[rng.choice([i for i, v in enumerate(levels) if v > 0])] -= 1
    while sum(levels) < total:
        levels[rng.choice([i for i, v in enumerate(levels) if v < top])] += 1
    return tuple(levels)


class NsgaSearch(Replayed):
    """NSGA-II (Optuna) at a fixed parameter count: `budget` distinct evaluations, the start genome first.

    Requests are handed out in rounds as `RandomSearch`'s are: the start alone, then `round_size` at a time.

    Args:
        space: the level space.
        start: the first candidate, and the level sums of all others.
        seed: the job seed.
        key: what tells this run from the job's other runs; part of ids and seeds.
        budget: evaluations to run.
        round_size: requests per round after the start's (default: all the rest).
        population: NSGA-II's population size.
        stage: the settings every candidate is scored with.
    """

    name = "nsga2"

    def __init__(
        self,
        space: LevelSpace,
        start: PruneGenome,
        *,
        seed: int,
        key: int | str,
        budget: int,
        round_size: int | None = None,
        population: int = 16,
        stage: Stage = DEFAULT_STAGES[-1],
    ):
        super().__init__()
        space.check(start)
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        self._space, self._start, self._seed, self._key, self._stage = space, start, seed, key, stage
        self._rounds = Rounds(budget, round_size or max(1, budget - 1))
        sampler = NSGAIISampler(population_size=population, seed=derive_seed(seed, key, self.name) % 2**32)
        self._study = optuna.create_study(direction="minimize", sampler=sampler)
        self._study.enqueue_trial(self._params(start))
        self._shared_seed = derive_seed(seed, key, self.name, "data")
        self._given: dict[str, tuple[PruneGenome, list]] = {}  # candidate id -> (genome, trials waiting on it)
        self._told: set[str] = set()
        self._known: dict[str, float | None] = {}  # genome key -> fitness, once told
        self._exhausted = False
        self._best = BestSoFar(start)

    def _params(self, genome: PruneGenome) -> dict:
        params = {f"attn_{i}": a for i, a in enumerate(genome.attn)}
        params.update({f"mlp_{i}": m for i, m in enumerate(genome.mlp)})
        return params

    def _propose(self) -> tuple[optuna.Trial, PruneGenome]:
        trial = self._study.ask()
        s, n = self._space, self._space.n_layers
        attn = [trial.suggest_int(f"attn_{i}", 0, s.attn_levels) for i in range(n)]
        mlp = [trial.suggest_int(f"mlp_{i}", 0, s.mlp_levels) for i in range(n)]
        rng = random.Random(derive_seed(self._seed, self._key, self.name, trial.number))
        genome = PruneGenome(
            attn=repair(attn, sum(self._start.attn), s.attn_levels, rng),
            mlp=repair(mlp, sum(self._start.mlp), s.mlp_levels, rng),
        )
        return trial, genome

    def _ask(self, limit: int | None) -> list[Request]:
        room = self._rounds.room(len(self._given), len(self._told))
        want = room if limit is None else min(limit, room)
        fresh: list[Request] = []
        pending = {g.key(): cid for cid, (g, _) in self._given.items() if cid not in self._told}
        repeats = 0
        while len(fresh) < want and not self._exhausted:
            trial, genome = self._propose()
            if genome.key() in self._known:  # seen and scored: answer from memory, no evaluation
                self._tell_trial(trial, self._known[genome.key()])
                repeats += 1
            elif genome.key() in pending:  # being evaluated: answer when it comes back
                self._given[pending[genome.key()]][1].append(trial)
                repeats += 1
            else:
                cid = f"t{self._key}-{self.name}-c{len(self._given)}"
                self._given[cid] = (genome, [trial])
                pending[genome.key()] = cid
                first = len(self._given) == 1
                fresh.append(Request(cid, genome, self._rounds.current, 0, first, self._shared_seed, self._stage, True))
                repeats = 0
            self._exhausted = repeats >= _MAX_REPEATS
        return fresh

    def _tell_trial(self, trial: optuna.Trial, fitness: float | None) -> None:
        if fitness is None:
            self._study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self._study.tell(trial, fitness)

    def _tell(self, candidate_id: str, fitness: float | None, error: str | None) -> None:
        if candidate_id not in self._given or candidate_id in self._told:
            raise ValueError(f"candidate {candidate_id!r} was not asked, or was told already")
        genome, trials = self._given[candidate_id]
        self._told.add(candidate_id)
        self._known[genome.key()] = fitness
        for trial in trials:
            self._tell_trial(trial, fitness)
        index = list(self._given).index(candidate_id)
        self._best.offer(fitness, index, genome)

    @property
    def finished(self) -> bool:
        asked_all = len(self._given) >= self._rounds.budget or self._exhausted
        return asked_all and len(self._told) == len(self._given)

    @property
    def evaluations(self) -> int:
        return len(self._told)

    @property
    def rounds(self) -> int:
        return self._rounds.completed(len(self._given), len(self._told), ended=self.finished)

    @property
    def best(self) -> PruneGenome:
        return self._best.candidate

    @property
    def best_fitness(self) -> float | None:
        return self._best.fitness
