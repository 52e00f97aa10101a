"""The registry of pruning search strategies: what a prune job's `search.strategy` names, and what each costs.

Every strategy searches one target's level space from the uniform start and gets the evolution's budget
(`planned_budget`: the start, then every stage of every generation), in rounds of one generation's evaluations,
so strategies compare at equal cost and a job reports and checkpoints all of them the same way. The baselines
score every candidate on the last stage's terms (after its training when the job is training-aware).

- `evolution`: the staged (1+λ) evolution (DarwinLM; EvoPress-style with `prune.training_aware: false`);
- `random`: random genomes at the target's parameter count;
- `nsga2`: Optuna's NSGA-II, repaired to the target's parameter count;
- `uniform`: the uniform cut alone (one evaluation);
- `pagcp`: PAGCP's performance-aware greedy pass, layer by layer under a shared loss-increase budget
  (`search.pagcp`);
- `nirvana`: NIRVANA's global ranking per module type at an attention-vs-MLP balance γ, given or searched
  (`search.nirvana`; it reads the criterion's unit scores, which the runner passes in as `saliency`);
- `depth`: HierarchicalPrune's whole-block removal, later blocks first unless the block ablations say otherwise
  (`search.depth`).

`pagcp`, `nirvana` and `depth` plan their rounds from the results so far and may end before the budget is spent.
The evolution's mutation takes HierarchicalPrune's early-layer protection prior (`Plan.early_layer_prior`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from search.baselines import RandomSearch, UniformOnly
from search.depth import BlockRemoval
from search.evolution import Evolution
from search.genome import LevelSpace, PruneGenome
from search.mutation import early_layer_protection
from search.nirvana import NirvanaAllocation, UnitSaliency
from search.nsga import NsgaSearch
from search.pagcp import GreedyLayerwise
from search.strategy import Request, Stage, Strategy, evaluations_per_generation, planned_budget


@dataclass(frozen=True)
class Plan:
    """The search settings of one target: generations of `offspring` mutants through `stages`, and the options
    of the strategies that take one (each defaults to its paper's form).

    Attributes:
        early_layer_prior: the evolution's mutation prunes later layers likelier (`search.mutation.layer_prior`).
        gamma: `nirvana`'s MLP-over-attention sparsity ratio; None searches a grid.
        layer_order: the order `pagcp` visits layers in, `forward` or `reverse`.
    """

    generations: int
    offspring: int
    stages: tuple[Stage, ...]
    early_layer_prior: float = 0.0
    gamma: float | None = None
    layer_order: str = "forward"

    @property
    def survivors(self) -> list[int]:
        return [stage.survivors for stage in self.stages]

    @property
    def budget(self) -> int:
        return planned_budget(self.generations, self.offspring, self.survivors)

    @property
    def round_size(self) -> int:
        return evaluations_per_generation(self.offspring, self.survivors)


Builder = Callable[[LevelSpace, PruneGenome, int, int, Plan, UnitSaliency | None], Strategy[Request]]


@dataclass(frozen=True)
class Registered:
    """A strategy a prune job can run.

    Attributes:
        build: `build(space, start, seed, key, plan, saliency)`, the strategy of one target.
        spends_budget: whether it plans the evolution's budget (else it plans one evaluation: the start).
        needs_saliency: whether it reads the criterion's unit scores (the runner then passes a `UnitSaliency`).
    """

    build: Builder
    spends_budget: bool = True
    needs_saliency: bool = False


STRATEGIES: dict[str, Registered] = {
    "evolution": Registered(
        lambda space, start, seed, key, plan, saliency: Evolution(
            space, start, seed=seed, key=key, generations=plan.generations, offspring=plan.offspring,
            stages=plan.stages, mutate=early_layer_protection(plan.early_layer_prior),
        )
    ),
    "random": Registered(
        lambda space, start, seed, key, plan, saliency: RandomSearch(
            space, start, seed=seed, key=key, budget=plan.budget, round_size=plan.round_size, stage=plan.stages[-1]
        )
    ),
    "nsga2": Registered(
        lambda space, start, seed, key, plan, saliency: NsgaSearch(
            space, start, seed=seed, key=key, budget=plan.budget, round_size=plan.round_size, stage=plan.stages[-1]
        )
    ),
    "uniform": Registered(
        lambda space, start, seed, key, plan, saliency: UniformOnly(
            space, start, seed=seed, key=key, stage=plan.stages[-1]
        ),
        spends_budget=False,
    ),
    "pagcp": Registered(
        lambda space, start, seed, key, plan, saliency: GreedyLayerwise(
            space, start, seed=seed, key=key, budget=plan.budget, stage=plan.stages[-1], order=plan.layer_order
        )
    ),
    "nirvana": Registered(
        lambda space, start, seed, key, plan, saliency: NirvanaAllocation(
            space, start, seed=seed, key=key, budget=plan.budget, saliency=saliency, gamma=plan.gamma,
            stage=plan.stages[-1],
        ),
        needs_saliency=True,
    ),
    "depth": Registered(
        lambda space, start, seed, key, plan, saliency: BlockRemoval(
            space, start, seed=seed, key=key, budget=plan.budget, stage=plan.stages[-1]
        )
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


def build(
    name: str, space: LevelSpace, start: PruneGenome, *, seed: int, key: int, plan: Plan,
    saliency: UnitSaliency | None = None,
) -> Strategy[Request]:
    """Strategy `name` for one target, searching from `start` (key: the target's index, part of ids and seeds);
    `saliency`: the criterion's unit scores, for a strategy that `needs_saliency`."""
    return lookup(name).build(space, start, seed, key, plan, saliency)


def planned_evaluations(name: str, *, generations: int, offspring: int, survivors: Sequence[int]) -> int:
    """Evaluations strategy `name` plans for one target; a run can stop early (a small space), never run more."""
    return planned_budget(generations, offspring, survivors) if lookup(name).spends_budget else 1
