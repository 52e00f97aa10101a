"""The registry of pruning search strategies: what a prune job's `search.strategy` names, and what each costs.

Every strategy searches one target's level space from the uniform start and gets the evolution's budget
(`planned_budget`: the start, then every stage of every generation), in rounds of one generation's evaluations,
so strategies compare at equal cost and a job reports and checkpoints all of them the same way. The baselines
score every candidate on the last stage's terms (after its training when the job is training-aware).

- `evolution`: the staged (1+λ) evolution (DarwinLM; EvoPress-style with `prune.training_aware: false`);
- `random`: random genomes at the target's parameter count;
- `nsga2`: Optuna's NSGA-II, repaired to the target's parameter count;
- `uniform`: the uniform cut alone (one evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from search.baselines import RandomSearch, UniformOnly
from search.evolution import Evolution
from search.genome import LevelSpace, PruneGenome
from search.nsga import NsgaSearch
from search.strategy import Request, Stage, Strategy, evaluations_per_generation, planned_budget


@dataclass(frozen=True)
class Plan:
    """The search settings of one target: generations of `offspring` mutants through `stages`."""

    generations: int
    offspring: int
    stages: tuple[Stage, ...]

    @property
    def survivors(self) -> list[int]:
        return [stage.survivors for stage in self.stages]

    @property
    def budget(self) -> int:
        return planned_budget(self.generations, self.offspring, self.survivors)

    @property
    def round_size(self) -> int:
        return evaluations_per_generation(self.offspring, self.survivors)


Builder = Callable[[LevelSpace, PruneGenome, int, int, Plan], Strategy[Request]]


@dataclass(frozen=True)
class Registered:
    """A strategy a prune job can run.

    Attributes:
        build: `build(space, start, seed, key, plan)`, the strategy of one target.
        spends_budget: whether it plans the evolution's budget (else it plans one evaluation: the start).
    """

    build: Builder
    spends_budget: bool = True


STRATEGIES: dict[str, Registered] = {
    "evolution": Registered(
        lambda space, start, seed, key, plan: Evolution(
            space, start, seed=seed, key=key, generations=plan.generations, offspring=plan.offspring,
            stages=plan.stages,
        )
    ),
    "random": Registered(
        lambda space, start, seed, key, plan: RandomSearch(
            space, start, seed=seed, key=key, budget=plan.budget, round_size=plan.round_size, stage=plan.stages[-1]
        )
    ),
    "nsga2": Registered(
        lambda space, start, seed, key, plan: NsgaSearch(
            space, start, seed=seed, key=key, budget=plan.budget, round_size=plan.round_size, stage=plan.stages[-1]
        )
    ),
    "uniform": Registered(
        lambda space, start, seed, key, plan: UniformOnly(space, start, seed=seed, key=key, stage=plan.stages[-1]),
        spends_budget=False,
    ),
}


def names() -> list[str]:
    return sorted(STRATEGIES)


def lookup(name: str) -> Registered:
    """The registered strategy `name`.

    Raises:
        ValueError: no strategy of that name.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown search strategy {name!r}; known: {', '.join(names())}")
    return STRATEGIES[name]


def build(name: str, space: LevelSpace, start: PruneGenome, *, seed: int, key: int, plan: Plan) -> Strategy[Request]:
    """Strategy `name` for one target, searching from `start` (key: the target's index, part of ids and seeds)."""
    return lookup(name).build(space, start, seed, key, plan)


def planned_evaluations(name: str, *, generations: int, offspring: int, survivors: Sequence[int]) -> int:
    """Evaluations strategy `name` plans for one target; a run can stop early (a small space), never run more."""
    return planned_budget(generations, offspring, survivors) if lookup(name).spends_budget else 1
