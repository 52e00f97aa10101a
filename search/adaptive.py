"""Strategies that plan one round from the results of the rounds before it (PAGCP, NIRVANA, block removal).

`RoundByRound` keeps the bookkeeping such a strategy shares: requests handed out a round at a time (the next one
planned once every request of the open one is told), ids and the shared data seed, the evaluation budget, the
best of the final requests, and checkpoints by replay (`search.replay.Replayed`). A subclass only says what the
next round holds, from the fitnesses so far (`_next_round`).

Every request is scored on one stage's terms with one shared seed, like the baselines'. A request is `final`
(it may enter the front) when the subclass says so, which for these strategies means: at the size the job asked
for, or, for NIRVANA's allocations, the closest size its rounding reaches.
"""

from __future__ import annotations

from search.evolution import DEFAULT_STAGES
from search.genome import LevelSpace, PruneGenome
from search.replay import Replayed
from search.seeding import derive_seed
from search.strategy import BestSoFar, Request, Stage, told_index


class RoundByRound(Replayed):
    """ask/tell over rounds that a subclass plans one at a time; at most `budget` requests in all.

    The first round is `start` alone (marked `is_parent`, final). Subclasses implement `_next_round()`, called
    once the open round is all told: the (genome, final) pairs of the next round, [] when the search is done.
    A round larger than the budget left is cut to it. Genomes seen before are not asked again (`_fitness_of`
    still answers for them).
    """

    name: str

    def __init__(self, space: LevelSpace, start: PruneGenome, *, seed: int, key: int | str, budget: int,
                 stage: Stage = DEFAULT_STAGES[-1]):
        super().__init__()
        space.check(start)
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        self._space, self._start, self._key, self._stage, self._budget = space, start, key, stage, budget
        self._shared_seed = derive_seed(seed, key, self.name)
        self._requests: list[Request] = []
        self._by_key: dict[str, str] = {}  # genome key -> candidate id
        self._results: dict[str, float | None] = {}
        self._given, self._round, self._done = 0, 0, False
        self._best = BestSoFar(start)
        self._open([(start, True)])  # a subclass's own state is set before this runs

    # ---- what subclasses implement and use ------------------------------------------------------------------

    def _next_round(self) -> list[tuple[PruneGenome, bool]]:
        raise NotImplementedError

    def _fitness_of(self, genome: PruneGenome) -> float | None:
        """The told fitness of `genome` (None: failed, or never asked)."""
        cid = self._by_key.get(genome.key())
        return None if cid is None else self._results.get(cid)

    @property
    def _budget_left(self) -> int:
        return self._budget - len(self._requests)

    # ---- bookkeeping ----------------------------------------------------------------------------------------

    def _open(self, planned: list[tuple[PruneGenome, bool]]) -> int:
        """Add the unseen genomes of `planned` (as far as the budget goes) as the open round; return how many."""
        fresh = []
        for genome, final in planned:
            self._space.check(genome)
            if genome.key() not in self._by_key and len(fresh) < self._budget_left:
                fresh.append((genome, final))
                self._by_key[genome.key()] = ""  # claimed; the id is set below
        for genome, final in fresh:
            index = len(self._requests)
            cid = f"t{self._key}-{self.name}-c{index}"
            self._by_key[genome.key()] = cid
            self._requests.append(Request(cid, genome, self._round, 0, index == 0, self._shared_seed, self._stage,
                                          final))
        return len(fresh)

    def _advance(self) -> None:
        """Plan rounds until one holds a new request or the search is done."""
        if len(self._results) < len(self._requests) or self._done:
            return
        self._round += 1
        while True:
            planned = self._next_round() if self._budget_left > 0 else []
            if not planned:
                self._done, self._round = True, self._round - 1  # no round opened: it does not count
                return
            if self._open(planned):
                return
            # every genome of that round was seen before: the subclass has their fitnesses, plan on

    def _ask(self, limit: int | None) -> list[Request]:
        end = len(self._requests) if limit is None else min(len(self._requests), self._given + max(0, limit))
        fresh = self._requests[self._given : end]
        self._given = end
        return fresh

    def _tell(self, candidate_id: str, fitness: float | None, error: str | None) -> None:
        index = told_index(self._requests, self._given, self._results, candidate_id)
        self._results[candidate_id] = fitness
        if self._requests[index].final:
            self._best.offer(fitness, index, self._requests[index].genome)
        self._advance()

    # ---- read-only views ------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._done and len(self._results) == len(self._requests)

    @property
    def evaluations(self) -> int:
        return len(self._results)

    @property
    def rounds(self) -> int:
        """Rounds whose requests are all told (the start's is round 0)."""
        return self._round + 1 if self.finished else self._round

    @property
    def best(self) -> PruneGenome:
        """The best final genome so far (`start` until something succeeded)."""
        return self._best.candidate

    @property
    def best_fitness(self) -> float | None:
        return self._best.fitness
