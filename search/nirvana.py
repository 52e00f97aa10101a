"""NIRVANA (Ai et al., 2025): one global ranking per module type, an attention-vs-MLP balance γ, MLP widths in
multiples of 8, as an ask/tell strategy.

NIRVANA removes, across all layers at once, the lowest-scored KV groups and the lowest-scored MLP channels, with
the MLP sparsity γ times the attention sparsity and both together removing the budget's parameters; at least one
KV group stays in every layer, and every layer's MLP keeps a multiple of 8 channels. So the per-layer sparsity
follows the scores, and only γ is chosen by hand (3.36 for Llama-3.1-8B) or searched.

Here the scores are the job's criterion's unit scores (`UnitSaliency`, handed to the strategy by the runner as
plain floats: the only way unit scores reach `search/`), the units are removed per layer in the level
database's order, and the result is snapped to the level grid (largest remainders, so the group totals stay as
close to the allocation as the grid allows; MLP levels only where the width left is a multiple of 8). With
`gamma` given the strategy scores the uniform start and that one allocation; without it, a grid of γ values
(`GAMMAS`, thinned to the budget) in one round, and the best scored allocation wins.

What differs from the paper: the saliency is whatever criterion the job names (NIRVANA's own |W·∂f/∂W| with f
the max-over-positions logit is closest to `taylor`), and the sizes are those of the level grid. The paper's
rounding of MLP widths up to 8 leaves a model slightly larger than the target; here an allocation short of the
target's removed parameters is topped up with the lowest-scored next blocks (MLP first), so it is never larger
than the target and compares at equal size with the other strategies (it can be smaller by part of a step).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from search.adaptive import RoundByRound
from search.evolution import DEFAULT_STAGES
from search.genome import LevelSpace, PruneGenome
from search.strategy import Stage

# The γ grid a search without a given γ scores (the paper's 3.0 and 3.36 sit between 2 and 4).
GAMMAS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
MLP_MULTIPLE = 8


@dataclass(frozen=True)
class UnitSaliency:
    """A criterion's unit scores as the search sees them: per layer, the scores of its units in the level
    database's removal order (higher = keep), and the units one level step removes.

    Attributes:
        attn: per layer, attention-unit scores in removal order.
        mlp: per layer, MLP-channel scores in removal order.
        attn_step: attention units per level step.
        mlp_step: MLP channels per level step.
    """

    attn: tuple[tuple[float, ...], ...]
    mlp: tuple[tuple[float, ...], ...]
    attn_step: int
    mlp_step: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn", tuple(tuple(float(x) for x in layer) for layer in self.attn))
        object.__setattr__(self, "mlp", tuple(tuple(float(x) for x in layer) for layer in self.mlp))

    def check(self, space: LevelSpace) -> None:
        """Raise ValueError unless these scores describe `space`'s model."""
        ok = len(self.attn) == len(self.mlp) == space.n_layers and self.attn_step >= 1 and self.mlp_step >= 1
        ok = ok and all(len(a) >= space.attn_levels * self.attn_step for a in self.attn)
        ok = ok and all(len(m) >= space.mlp_levels * self.mlp_step for m in self.mlp)
        if not ok:
            raise ValueError(f"unit scores of {len(self.attn)} layers (steps {self.attn_step}/{self.mlp_step}) do "
                             f"not fit the level space of {space.n_layers} layers")

    def to_dict(self) -> dict:
        return {"attn": [list(a) for a in self.attn], "mlp": [list(m) for m in self.mlp],
                "attn_step": self.attn_step, "mlp_step": self.mlp_step}

    @classmethod
    def from_dict(cls, data: dict) -> UnitSaliency:
        return cls(attn=data["attn"], mlp=data["mlp"], attn_step=data["attn_step"], mlp_step=data["mlp_step"])


def lowest_prefixes(scores: Sequence[Sequence[float]], count: int, caps: Sequence[int]) -> list[int]:
    """How many units of each layer the `count` globally lowest scores take, each layer's taken as a prefix of
    its order and at most `caps[l]` (ties: the later layer first)."""
    taken = [0] * len(scores)
    heap = [(layer[0], -i) for i, layer in enumerate(scores) if caps[i] > 0]
    heapq.heapify(heap)
    for _ in range(count):
        if not heap:
            break
        _, neg = heapq.heappop(heap)
        i = -neg
        taken[i] += 1
        if taken[i] < caps[i]:
            heapq.heappush(heap, (scores[i][taken[i]], neg))
    return taken


def snap(counts: Sequence[int], step: int, top: int) -> list[int]:
    """Per-layer levels of `step` units near `counts` units, at most `top`, with the total levels
    round(sum(counts) / step) as far as the caps allow: floors, then one more level for the largest remainders."""
    levels = [min(top, c // step) for c in counts]
    want = min(round(sum(counts) / step), top * len(counts))
    order = sorted(range(len(counts)), key=lambda i: (-(counts[i] / step - counts[i] // step), -i))
    for i in order * 2:  # a second pass when capped layers left some over
        if sum(levels) >= want:
            break
        if levels[i] < top:
            levels[i] += 1
    return levels


def sparsities(space: LevelSpace, saliency: UnitSaliency, removed: int, gamma: float, caps: tuple[float, float],
               ) -> tuple[float, float]:
    """Attention and MLP sparsities (s, min(γs, MLP cap)) that remove `removed` parameters, the attention one
    raised past γ's share once the MLP is at its cap; both capped (`caps`: the largest removable fractions)."""
    n_attn, n_mlp = len(saliency.attn[0]), len(saliency.mlp[0])
    per_attn = space.attn_unit_params / saliency.attn_step * n_attn * space.n_layers  # params at s = 1
    per_mlp = space.mlp_level_params / saliency.mlp_step * n_mlp * space.n_layers

    def total(s: float) -> float:
        return s * per_attn + min(gamma * s, caps[1]) * per_mlp

    lo, hi = 0.0, caps[0]
    if total(hi) <= removed:
        rest = (removed - hi * per_attn) / per_mlp
        return hi, min(caps[1], rest)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < removed else (lo, mid)
    return lo, min(gamma * lo, caps[1])


def allocate(space: LevelSpace, saliency: UnitSaliency, removed: int, gamma: float, *,
             multiple: int = MLP_MULTIPLE, keep_attention: int = 1) -> PruneGenome:
    """NIRVANA's allocation of `removed` parameters at balance `gamma`, on the level grid.

    Every layer keeps at least `keep_attention` attention units, and its MLP width stays a multiple of
    `multiple` (when the full width is one).
    """
    saliency.check(space)
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    n_layers, n_attn, n_mlp = space.n_layers, len(saliency.attn[0]), len(saliency.mlp[0])
    attn_top = min(space.attn_levels, (n_attn - keep_attention) // saliency.attn_step)
    # MLP levels j * k0 leave a width that is a multiple of `multiple` (k0 * step is the smallest such cut)
    k0 = multiple // math.gcd(saliency.mlp_step, multiple) if n_mlp % multiple == 0 else 1
    mlp_top = space.mlp_levels // k0
    caps = (attn_top * saliency.attn_step / n_attn, mlp_top * k0 * saliency.mlp_step / n_mlp)
    s_attn, s_mlp = sparsities(space, saliency, removed, gamma, caps)
    attn_cap, mlp_cap = attn_top * saliency.attn_step, mlp_top * k0 * saliency.mlp_step
    attn_counts = lowest_prefixes(saliency.attn, round(s_attn * n_attn * n_layers), [attn_cap] * n_layers)
    mlp_counts = lowest_prefixes(saliency.mlp, round(s_mlp * n_mlp * n_layers), [mlp_cap] * n_layers)
    attn = snap(attn_counts, saliency.attn_step, attn_top)
    mlp = [k0 * level for level in snap(mlp_counts, k0 * saliency.mlp_step, mlp_top)]
    return top_up(space, saliency, PruneGenome(attn=tuple(attn), mlp=tuple(mlp)), removed,
                  {"attn": (1, attn_top), "mlp": (k0, mlp_top * k0)})


def top_up(space: LevelSpace, saliency: UnitSaliency, genome: PruneGenome, removed: int,
           moves: dict[str, tuple[int, int]]) -> PruneGenome:
    """`genome` with more levels until it removes at least `removed` parameters, so an allocation is never larger
    than the size asked for: each time the next block of `moves[group] = (levels per move, top level)` whose
    units score lowest on average, MLP first (its steps are the finer ones), then attention."""
    levels = {"attn": list(genome.attn), "mlp": list(genome.mlp)}
    step_units = {"attn": saliency.attn_step, "mlp": saliency.mlp_step}

    def short() -> bool:
        return space.dense_params - space.params(PruneGenome(attn=levels["attn"], mlp=levels["mlp"])) < removed

    def next_mean(group: str, i: int) -> tuple[float, int]:
        """The mean score of the units layer i's next move in `group` removes (ties: the later layer)."""
        start = levels[group][i] * step_units[group]
        stop = (levels[group][i] + moves[group][0]) * step_units[group]
        return sum(getattr(saliency, group)[i][start:stop]) / (stop - start), -i

    for group in ("mlp", "attn"):
        by, top = moves[group]
        while short():
            room = [i for i in range(space.n_layers) if levels[group][i] + by <= top]
            if not room:
                break
            levels[group][min(room, key=lambda i, g=group: next_mean(g, i))] += by
    return PruneGenome(attn=tuple(levels["attn"]), mlp=tuple(levels["mlp"]))


def gamma_grid(gamma: float | None, room: int) -> list[float]:
    """The γ values to score: the given one, or `GAMMAS` thinned evenly to `room` values."""
    if gamma is not None:
        return [gamma]
    if room >= len(GAMMAS):
        return list(GAMMAS)
    return [GAMMAS[round(j * (len(GAMMAS) - 1) / max(1, room - 1))] for j in range(max(1, room))]


class NirvanaAllocation(RoundByRound):
    """The uniform start, then NIRVANA's global allocation at γ (given, or each of a grid), all final.

    Args:
        space: the level space.
        start: the uniform cut; its removed parameters are the budget every allocation spends.
        seed: the job seed (the allocations depend on the scores only; the data seed on it).
        key: what tells this run from the job's other runs; part of ids and seeds.
        budget: evaluations at most.
        saliency: the job criterion's unit scores (`UnitSaliency`).
        gamma: MLP sparsity over attention sparsity; None searches `GAMMAS`.
        stage: the settings every candidate is scored with.
    """

    name = "nirvana"

    def __init__(self, space: LevelSpace, start: PruneGenome, *, seed: int, key: int | str, budget: int,
                 saliency: UnitSaliency | None, gamma: float | None = None, stage: Stage = DEFAULT_STAGES[-1]):
        if saliency is None:
            raise ValueError("the nirvana strategy needs the criterion's unit scores (the runner passes them)")
        saliency.check(space)
        removed = space.dense_params - space.params(start)
        self.gammas = gamma_grid(gamma, budget - 1)
        self._allocations = [allocate(space, saliency, removed, g) for g in self.gammas]
        self._offered = False
        super().__init__(space, start, seed=seed, key=key, budget=budget, stage=stage)

    def _next_round(self) -> list[tuple[PruneGenome, bool]]:
        if self._offered:
            return []
        self._offered = True
        return [(genome, True) for genome in self._allocations]
