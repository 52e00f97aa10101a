"""PAGCP (Ye et al., TPAMI'23): performance-aware greedy global pruning, as an ask/tell strategy.

PAGCP visits the layers one after another; each is pruned, on the model pruned so far, as far as a loss-increase
threshold allows (the ratio raised over a grid, the last ratio under the threshold committed), and the
thresholds of all layers together make one shared budget. Here a unit of the visit is one sub-layer (a layer's
attention, then its MLP) and a ratio is a level:

- the loss is the fitness (KL to the dense model), so the dense genome's loss is 0 and the budget is additive: the
  total increase allowed is `loss_budget` times the uniform cut's KL (the start, scored first), so a result
  inside the budget beats the uniform cut at its size;
- the budget is shared: unit i may spend the budget not yet spent times `w_i / sum(w_j, j >= i)` over the
  units still to visit, with `w_i = decay**i` (PAGCP's geometric schedule tau_i = tau_0 * lambda**i), so what an
  insensitive unit leaves goes to the ones after it;
- a unit's grid is every level up to what its group still needs (its levels evaluated together as one round;
  the same choice as raising them one by one and stopping at the first over the threshold, at the cost of the
  levels above it), thinned evenly when the evaluation budget cannot pay for every level of every unit;
- the job asks for a size, so the attention and MLP level sums stay the start's: a group stops being pruned
  once its sum is reached, and the search ends when both are. Levels still missing after the visit (the loss
  budget or the evaluation budget ran out) are spread over the least-pruned units, later ones first, and that
  genome is scored as the final one.

What differs from the paper: no per-task losses (one fitness), no FLOPs order (every layer of a Llama-family
model costs the same, so the order is the layer order, `forward` or `reverse`), and no fine-tuning rounds in
between (the job's training-aware selection or `posttrain` is the analogue).
"""

from __future__ import annotations

import math

from search.adaptive import RoundByRound
from search.evolution import DEFAULT_STAGES
from search.genome import LevelSpace, PruneGenome
from search.strategy import Stage

ORDERS = ("forward", "reverse")
GROUPS = ("attn", "mlp")


def visiting_order(n_layers: int, order: str) -> list[tuple[int, str]]:
    """The (layer, group) units in visiting order: a layer's attention, then its MLP."""
    if order not in ORDERS:
        raise ValueError(f"unknown layer order {order!r}; known: {', '.join(ORDERS)}")
    layers = range(n_layers) if order == "forward" else range(n_layers - 1, -1, -1)
    return [(layer, group) for layer in layers for group in GROUPS]


def grid(cap: int, points: int) -> list[int]:
    """`points` levels spread evenly over 1..`cap`, `cap` included (every level when there is room)."""
    if cap < 1:
        return []
    if points >= cap:
        return list(range(1, cap + 1))
    return sorted({math.ceil(cap * (j + 1) / points) for j in range(max(1, points))})


def committed_level(levels: list[int], increases: list[float | None], allowance: float) -> int:
    """The highest grid level whose loss increase, and every lower grid level's, is within `allowance` (0: none).

    A failed evaluation (None) counts as over the threshold.
    """
    chosen = 0
    for level, increase in zip(levels, increases, strict=True):
        if increase is None or increase > allowance:
            break
        chosen = level
    return chosen


def fill(genome: PruneGenome, space: LevelSpace, totals: dict[str, int], units: list[tuple[int, str]]) -> PruneGenome:
    """`genome` with the levels each group still lacks of `totals`, one at a time to its least-pruned layer
    (ties: the unit visited later first)."""
    levels = {"attn": list(genome.attn), "mlp": list(genome.mlp)}
    rank = {unit: i for i, unit in enumerate(units)}
    for group in GROUPS:
        top = space.attn_levels if group == "attn" else space.mlp_levels
        while sum(levels[group]) < totals[group]:
            room = [i for i in range(space.n_layers) if levels[group][i] < top]
            pick = min(room, key=lambda i: (levels[group][i], -rank[(i, group)]))
            levels[group][pick] += 1
    return PruneGenome(attn=tuple(levels["attn"]), mlp=tuple(levels["mlp"]))


class GreedyLayerwise(RoundByRound):
    """PAGCP's sequential greedy pruning over the level space, at the start's level sums (see the module).

    Args:
        space: the level space.
        start: the uniform cut: scored first, its KL is the loss budget's scale and its level sums the size.
        seed: the job seed (only the data seed depends on it: the greedy path is decided by the fitnesses).
        key: what tells this run from the job's other runs; part of ids and seeds.
        budget: evaluations at most.
        stage: the settings every candidate is scored with.
        order: `forward` (layer 0 first) or `reverse` (the last layer first).
        loss_budget: the total KL increase allowed, in units of the uniform cut's KL.
        decay: PAGCP's lambda: unit i's share of the remaining budget weighs `decay**i`.
    """

    name = "pagcp"

    def __init__(self, space: LevelSpace, start: PruneGenome, *, seed: int, key: int | str, budget: int,
                 stage: Stage = DEFAULT_STAGES[-1], order: str = "forward", loss_budget: float = 1.0,
                 decay: float = 1.0):
        if loss_budget <= 0 or decay <= 0:
            raise ValueError(f"loss_budget and decay must be > 0, got {loss_budget}, {decay}")
        self._units = visiting_order(space.n_layers, order)
        self._totals = {"attn": sum(start.attn), "mlp": sum(start.mlp)}
        self._loss_budget, self._decay = loss_budget, decay
        self._current = PruneGenome(attn=(0,) * space.n_layers, mlp=(0,) * space.n_layers)
        self._current_kl = 0.0  # the dense model's KL to itself
        self._next_unit = 0
        self._pending: tuple[int, list[int], list[PruneGenome]] | None = None  # unit, its grid, their genomes
        self._filled = False
        super().__init__(space, start, seed=seed, key=key, budget=budget, stage=stage)

    def _needs(self, genome: PruneGenome) -> dict[str, int]:
        return {"attn": self._totals["attn"] - sum(genome.attn), "mlp": self._totals["mlp"] - sum(genome.mlp)}

    def _with(self, layer: int, group: str, level: int) -> PruneGenome:
        levels = list(getattr(self._current, group))
        levels[layer] = level
        return PruneGenome(**{"attn": self._current.attn, "mlp": self._current.mlp, group: tuple(levels)})

    def _allowance(self, unit: int) -> float:
        scale = self._fitness_of(self._start)
        total = self._loss_budget * (scale if scale is not None else 0.0)
        weights = [self._decay**i for i in range(unit, len(self._units))]
        return max(0.0, total - self._current_kl) * weights[0] / sum(weights)

    def _commit_pending(self) -> None:
        unit, levels, genomes = self._pending
        increases = [None if (f := self._fitness_of(g)) is None else f - self._current_kl for g in genomes]
        level = committed_level(levels, increases, self._allowance(unit))
        if level:
            self._current = genomes[levels.index(level)]
            self._current_kl = self._fitness_of(self._current)
        self._pending = None

    def _next_round(self) -> list[tuple[PruneGenome, bool]]:
        if self._pending is not None:
            self._commit_pending()
        needs = self._needs(self._current)
        if not any(needs.values()) or self._filled:
            return []  # at the size: the committed genome was scored (final) in its grid
        todo = [u for u in range(self._next_unit, len(self._units)) if needs[self._units[u][1]] > 0]
        if todo and self._budget_left >= 2:  # one evaluation stays for the fill
            unit = todo[0]
            layer, group = self._units[unit]
            top = self._space.attn_levels if group == "attn" else self._space.mlp_levels
            points = max(1, (self._budget_left - 1) // len(todo))
            levels = grid(min(top, needs[group]), points)
            genomes = [self._with(layer, group, level) for level in levels]
            self._next_unit, self._pending = unit + 1, (unit, levels, genomes)
            return [(g, not any(self._needs(g).values())) for g in genomes]  # final: at the start's level sums
        self._filled = True
        return [(fill(self._current, self._space, self._totals, self._units), True)]
