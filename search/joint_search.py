"""Searches of the joint space (pruning levels + KV pairs) against (KL, memory), or (KL, memory, latency) when the
job measures latency, as ask/tell strategies.

Both strategies are told the KL the driver measures (and the latency, `tell(..., latency=ms)`, when built with
`latency=True`) and read the memory off the genome (`JointSpace.memory`, exact), so a genome over the memory cap
is never handed out: it costs no evaluation. They hand out their seeds first (`seed_genomes`: the best points of
separate prune and KV jobs when the job names them, then the grid of the dense model and the uniform cuts
crossed with the uniform KV choices: every group at its highest pair, its lowest and each KVTuner preset, as the
kv_precision job seeds its search), then rounds of `round_size` genomes, and stop after `budget` distinct
evaluations.

- `evolution`: a Pareto evolution with mixed mutation: every child is a parent drawn from the current front
  (feasible, non-dominated in all the objectives) with 1..3 moves, each a KV pair change (one group's pair one
  step up or down its Pareto-pruned candidate list) with probability `kv_rate`, else a level move (one layer's
  attention or MLP level one step up or down, or an EvoPress level switch that keeps the parameter count). The
  rate adapts (`move_rate`): it starts at `kv_rate` and is weighted by how often children of each kind of move
  reached the front when told.
- `nsga2`: Optuna's NSGA-II over one integer per layer and group and one categorical per KV group, on two or
  three objectives.

Checkpoints replay asks and tells (`search.replay.Replayed`). Pure Python besides Optuna.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.samplers import NSGAIISampler

from search.joint_space import JointGenome, JointSpace, kv_choice_for
from search.kv_space import PRESETS, preset
from search.mutation import level_switch, switch_count
from search.pareto import dominates, non_dominated
from search.replay import Replayed, Rounds
from search.seeding import derive_seed
from search.strategy import BestSoFar

_MAX_REPEATS = 200  # proposals in a row that are seen or over the cap before a strategy gives up


@dataclass(frozen=True)
class JointRequest:
    """One joint genome to evaluate."""

    candidate_id: str
    genome: JointGenome
    round: int

    def to_dict(self) -> dict:
        return {"candidate_id": self.candidate_id, "genome": self.genome.to_dict(), "round": self.round}


def mixed_mutation(parent: JointGenome, space: JointSpace, rng: random.Random, *, kv_rate: float = 0.5,
                   max_moves: int = 3) -> JointGenome:
    """`switch_count(rng, max_moves)` moves of `parent`: KV pair changes (probability `kv_rate`) and level moves.

    A KV move steps one group to a neighbour in its Pareto-pruned pair list (one step up or down in bits); a level
    move is an EvoPress level switch (half the time, when one is legal) or one layer's attention or MLP level one
    step up or down."""
    attn, mlp, kv = list(parent.attn), list(parent.mlp), list(parent.kv)
    for _ in range(switch_count(rng, max_moves)):
        if rng.random() < kv_rate:
            g = rng.randrange(len(kv))
            kv[g] = kv_step(kv[g], len(space.kv.groups[g].candidates), rng)
            continue
        levels = space.levels
        if rng.random() < 0.5:  # a level switch: the same parameters, moved between layers
            try:
                moved = level_switch(JointGenome(attn, mlp, kv).prune, levels, rng, max_switches=1)
                attn, mlp = list(moved.attn), list(moved.mlp)
                continue
            except ValueError:  # InvalidSpec: no legal switch; take a step instead
                pass
        group, top = (attn, levels.attn_levels) if rng.random() * (levels.attn_levels + levels.mlp_levels) < \
            levels.attn_levels else (mlp, levels.mlp_levels)
        i = rng.randrange(len(group))
        group[i] = min(top, max(0, group[i] + rng.choice((-1, 1))))
    return JointGenome(tuple(attn), tuple(mlp), tuple(kv))


def kv_step(index: int, candidates: int, rng: random.Random) -> int:
    """A neighbour of candidate `index` in a list of `candidates` pairs: one step up or down, inward at an end."""
    if candidates < 2:
        return 0
    if index == 0:
        return 1
    if index == candidates - 1:
        return index - 1
    return index + rng.choice((-1, 1))


def random_genome(space: JointSpace, rng: random.Random) -> JointGenome:
    """Levels and KV choices drawn uniformly, layer by layer and group by group."""
    n, levels = space.levels.n_layers, space.levels
    return JointGenome(tuple(rng.randint(0, levels.attn_levels) for _ in range(n)),
                       tuple(rng.randint(0, levels.mlp_levels) for _ in range(n)),
                       tuple(rng.randrange(len(g.candidates)) for g in space.kv.groups))


class _JointBase(Replayed):
    """What both joint strategies share: seeds first, the cap, the budget, ids, the front of what was told."""

    def __init__(self, space: JointSpace, seeds: Sequence[JointGenome], *, seed: int, budget: int,
                 round_size: int, memory_cap: int | None = None, latency: bool = False):
        super().__init__()
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        self._space, self._seed, self._cap, self._latency = space, seed, memory_cap, latency
        unique = {}
        for genome in seeds:
            space.check(genome)
            if self.feasible(genome):
                unique.setdefault(genome.key(), genome)
        self._seeds = list(unique.values())[:budget]
        self._rounds = Rounds(budget, round_size, first=max(1, len(self._seeds)))
        self._given: dict[str, JointGenome] = {}
        self._keys: set[str] = set()
        self._results: dict[str, float | None] = {}  # candidate id -> KL (None: failed)
        self._latencies: dict[str, float] = {}  # candidate id -> measured ms (latency searches)
        self._exhausted = False
        self._best: BestSoFar[JointGenome | None] = BestSoFar(None)

    def feasible(self, genome: JointGenome) -> bool:
        return self._cap is None or self._space.memory(genome) <= self._cap

    def _hand_out(self, genome: JointGenome) -> JointRequest:
        cid = f"j-{self.name}-c{len(self._given)}"
        self._given[cid] = genome
        self._keys.add(genome.key())
        return JointRequest(cid, genome, self._rounds.current)

    def tell(self, candidate_id: str, fitness: float | None, error: str | None = None, *,
             latency: float | None = None) -> None:
        """Tell a candidate's KL (None: failed) and, in a latency search, its measured latency in ms.

        Raises:
            ValueError: A latency search told a KL without a finite, positive latency.
        """
        if self._latency and fitness is not None and not (latency is not None and 0 < latency < math.inf):
            raise ValueError(f"candidate {candidate_id!r}: a latency search needs its measured latency, got {latency}")
        self._logged_tell(candidate_id, fitness, error, *(() if latency is None else (float(latency),)))

    def _tell(self, candidate_id: str, fitness: float | None, error: str | None, latency: float | None = None) -> None:
        if candidate_id not in self._given or candidate_id in self._results:
            raise ValueError(f"candidate {candidate_id!r} was not asked, or was told already")
        self._results[candidate_id] = fitness
        if fitness is not None and latency is not None:
            self._latencies[candidate_id] = latency
        self._best.offer(fitness, list(self._given).index(candidate_id), self._given[candidate_id])
        self._told(candidate_id)

    def _told(self, candidate_id: str) -> None:
        """What a subclass does once a candidate's result is recorded."""

    def objectives(self, candidate_id: str) -> tuple[float, ...]:
        """A told, successful candidate's point: (KL, memory), and its latency in a latency search."""
        point = (self._results[candidate_id], float(self._space.memory(self._given[candidate_id])))
        return point + ((self._latencies[candidate_id],) if self._latency else ())

    def front(self) -> list[JointGenome]:
        """The told genomes no other dominates in all the objectives, by memory."""
        told = [cid for cid, kl in self._results.items() if kl is not None]
        points = [self.objectives(cid) for cid in told]
        return sorted((self._given[told[i]] for i in non_dominated(points)), key=self._space.memory)

    @property
    def finished(self) -> bool:
        asked_all = len(self._given) >= self._rounds.budget or self._exhausted
        return asked_all and len(self._results) == len(self._given)

    @property
    def evaluations(self) -> int:
        return len(self._results)

    @property
    def rounds(self) -> int:
        return self._rounds.completed(len(self._given), len(self._results), ended=self.finished)

    @property
    def best(self) -> JointGenome | None:
        """The lowest-KL genome so far (every handed-out genome fits the cap)."""
        return self._best.candidate

    @property
    def best_fitness(self) -> float | None:
        return self._best.fitness

    def _room(self, limit: int | None) -> int:
        room = self._rounds.room(len(self._given), len(self._results))
        return room if limit is None else min(room, max(0, limit))


class JointEvolution(_JointBase):
    """The Pareto evolution with mixed mutation (see the module docstring).

    Args:
        space: the joint space.
        seeds: the genomes of the first round (those over the cap are dropped).
        seed: the job seed.
        budget: evaluations to run.
        round_size: children per round after the seeds.
        memory_cap: bytes a genome may need at most (None: no cap).
        kv_rate: the probability that a move changes a KV pair rather than a level; with `adapt`, where it starts.
        adapt: the rate follows which kind of move put children on the front (`move_rate`); 0 and 1 stay fixed.
        latency: the measured latency is a third objective (told with each KL).
    """

    name = "joint-evolution"

    def __init__(self, space: JointSpace, seeds: Sequence[JointGenome], *, seed: int, budget: int, round_size: int,
                 memory_cap: int | None = None, kv_rate: float = 0.5, adapt: bool = True, latency: bool = False):
        super().__init__(space, seeds, seed=seed, budget=budget, round_size=round_size, memory_cap=memory_cap,
                         latency=latency)
        self._rng = random.Random(derive_seed(seed, self.name))
        self._kv_rate, self._adapt = kv_rate, adapt and 0 < kv_rate < 1
        self._parents: dict[str, JointGenome] = {}  # child id -> the parent it was mutated from
        self._tries = {"kv": 0, "level": 0}  # told children whose moves included the kind
        self._wins = {"kv": 0, "level": 0}  # ... and that were on the front when told

    @property
    def kv_rate(self) -> float:
        """The chance the next move changes a KV pair."""
        if not self._adapt:
            return self._kv_rate
        return move_rate(self._kv_rate, self._wins, self._tries)

    def _ask(self, limit: int | None) -> list[JointRequest]:
        want = self._room(limit)
        fresh = []
        while len(fresh) < want and self._seeds:
            fresh.append(self._hand_out(self._seeds.pop(0)))
        parents = self.front()
        rate = self.kv_rate
        repeats = 0
        while len(fresh) < want and not self._exhausted:
            parent = self._rng.choice(parents) if parents else None
            if parent is not None:
                child = mixed_mutation(parent, self._space, self._rng, kv_rate=rate)
            else:  # no seed fits the cap (or every one failed): random genomes until one does
                child = random_genome(self._space, self._rng)
            if child.key() in self._keys or not self.feasible(child):
                repeats += 1
                self._exhausted = repeats >= _MAX_REPEATS
                continue
            repeats = 0
            fresh.append(self._hand_out(child))
            if parent is not None:
                self._parents[fresh[-1].candidate_id] = parent
        return fresh

    def _told(self, candidate_id: str) -> None:
        parent = self._parents.pop(candidate_id, None)
        if parent is None or self._results[candidate_id] is None:
            return
        child = self._given[candidate_id]
        point = self.objectives(candidate_id)
        won = not any(dominates(self.objectives(cid), point) for cid, kl in self._results.items()
                      if kl is not None and cid != candidate_id)
        for kind, moved in (("kv", child.kv != parent.kv), ("level", child.prune != parent.prune)):
            if moved:
                self._tries[kind] += 1
                self._wins[kind] += won


def move_rate(prior: float, wins: dict[str, int], tries: dict[str, int], *, floor: float = 0.1) -> float:
    """The KV move rate after `wins` of `tries` children per move kind ("kv", "level") reached the front: `prior`
    weighted by each kind's success rate (Laplace-smoothed), kept within [floor, 1 - floor]."""
    kv, level = ((wins[k] + 1) / (tries[k] + 2) for k in ("kv", "level"))
    rate = prior * kv / (prior * kv + (1 - prior) * level)
    return min(1 - floor, max(floor, rate))


class JointNsga(_JointBase):
    """Optuna's NSGA-II on (KL, memory), or (KL, memory, latency), over the joint genome; the seeds are enqueued
    first.

    A proposal over the cap, or one already handed out, is told to the sampler without an evaluation (as a
    failure over the cap, or with the earlier result); `budget` counts distinct evaluations.
    """

    name = "joint-nsga2"

    def __init__(self, space: JointSpace, seeds: Sequence[JointGenome], *, seed: int, budget: int, round_size: int,
                 memory_cap: int | None = None, population: int = 16, latency: bool = False):
        super().__init__(space, seeds, seed=seed, budget=budget, round_size=round_size, memory_cap=memory_cap,
                         latency=latency)
        sampler = NSGAIISampler(population_size=max(2, population), seed=derive_seed(seed, self.name) % 2**32)
        self._study = optuna.create_study(directions=["minimize"] * (3 if latency else 2), sampler=sampler)
        for genome in self._seeds:
            self._study.enqueue_trial(self._params(genome))
        self._seeds = []  # the sampler hands them out, enqueued
        self._trials: dict[str, list[optuna.Trial]] = {}
        self._by_key: dict[str, str] = {}

    def _params(self, genome: JointGenome) -> dict:
        params = {f"attn_{i}": a for i, a in enumerate(genome.attn)}
        params.update({f"mlp_{i}": m for i, m in enumerate(genome.mlp)})
        params.update({f"kv_{g}": c for g, c in enumerate(genome.kv)})
        return params

    def _propose(self) -> tuple[optuna.Trial, JointGenome]:
        trial, s = self._study.ask(), self._space
        n = s.levels.n_layers
        attn = [trial.suggest_int(f"attn_{i}", 0, s.levels.attn_levels) for i in range(n)]
        mlp = [trial.suggest_int(f"mlp_{i}", 0, s.levels.mlp_levels) for i in range(n)]
        kv = [trial.suggest_int(f"kv_{g}", 0, len(group.candidates) - 1) for g, group in enumerate(s.kv.groups)]
        return trial, JointGenome(tuple(attn), tuple(mlp), tuple(kv))

    def _ask(self, limit: int | None) -> list[JointRequest]:
        want = self._room(limit)
        fresh, repeats = [], 0
        while len(fresh) < want and not self._exhausted:
            trial, genome = self._propose()
            key = genome.key()
            if not self.feasible(genome):
                self._study.tell(trial, state=optuna.trial.TrialState.FAIL)
                repeats += 1
            elif key in self._by_key:
                cid = self._by_key[key]
                if cid in self._results:
                    self._tell_trial(trial, cid)
                else:
                    self._trials[cid].append(trial)
                repeats += 1
            else:
                request = self._hand_out(genome)
                self._by_key[key] = request.candidate_id
                self._trials[request.candidate_id] = [trial]
                fresh.append(request)
                repeats = 0
            self._exhausted = repeats >= _MAX_REPEATS
        return fresh

    def _tell_trial(self, trial: optuna.Trial, candidate_id: str) -> None:
        if self._results[candidate_id] is None:
            self._study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self._study.tell(trial, list(self.objectives(candidate_id)))

    def _told(self, candidate_id: str) -> None:
        for trial in self._trials.pop(candidate_id):
            self._tell_trial(trial, candidate_id)


Builder = Callable[..., _JointBase]
STRATEGIES: dict[str, Builder] = {
    "evolution": lambda space, seeds, *, seed, budget, round_size, memory_cap, kv_rate, latency: JointEvolution(
        space, seeds, seed=seed, budget=budget, round_size=round_size, memory_cap=memory_cap, kv_rate=kv_rate,
        latency=latency),
    "nsga2": lambda space, seeds, *, seed, budget, round_size, memory_cap, kv_rate, latency: JointNsga(
        space, seeds, seed=seed, budget=budget, round_size=round_size, memory_cap=memory_cap,
        population=round_size, latency=latency),
}


def build(name: str, space: JointSpace, seeds: Sequence[JointGenome], *, seed: int, budget: int, round_size: int,
          memory_cap: int | None = None, kv_rate: float = 0.5, latency: bool = False) -> _JointBase:
    """The joint strategy `name` (one of `STRATEGIES`); `latency`: search (KL, memory, latency)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown joint strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](space, seeds, seed=seed, budget=budget, round_size=round_size, memory_cap=memory_cap,
                            kv_rate=kv_rate, latency=latency)


def seed_genomes(space: JointSpace, targets: Sequence[float], extra: Sequence[JointGenome] = ()) -> list[JointGenome]:
    """The first round: `extra` (from separate prune and KV fronts) first, then the grid of the dense model and every
    uniform cut at `targets` crossed with the uniform KV choices (`uniform_kv_choices`), duplicates dropped."""
    genomes = list(extra)
    for choice in uniform_kv_choices(space):
        genomes.append(space.dense(choice))
        genomes.extend(space.uniform(t, choice) for t in targets)
    return list({g.key(): g for g in genomes}.values())


def uniform_kv_choices(space: JointSpace) -> list[list[int]]:
    """Every group at its highest pair, at its lowest, and at each of KVTuner's uniform presets (KV8, K8V4, KV4,
    K4V2, KV2; a group whose pair list lost a preset takes its nearest pair), in that order, without repeats."""
    n = space.levels.n_layers
    choices = [[0] * len(space.kv.groups), [len(g.candidates) - 1 for g in space.kv.groups]]
    choices += [kv_choice_for(space.kv, preset(name, n)) for name in PRESETS]
    return [list(c) for c in dict.fromkeys(map(tuple, choices))]
