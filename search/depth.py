"""HierarchicalPrune (Kwon et al., AAAI'26): whole-block removal, later blocks first unless the data say
otherwise, as an ask/tell strategy.

A block is one layer's attention or its MLP; the level space removes one whole when its level is the top one
(`workers.levels`: the top level removes every unit when the step divides the width, and with query-head units
it frees the K/V heads too; an MLP whose width is not a multiple of `prune.mlp_multiple` keeps the remainder at
its top level, so there a "removed" MLP keeps those few channels). The start's level sums fix how many whole
blocks of each group go (the sum over the group's top level) and how many levels are left over, spread one per
layer over the blocks that stay.

Rounds: the uniform start; then each block ablated alone (that block at its top level, the rest dense; not
final), the later blocks first when the budget cannot pay for all; then two final genomes at the start's level
sums: the position prior (the last blocks of each group removed, the left-over levels on the latest layers that
stay) and the data's order (the blocks whose ablation raised the KL least, ties and unmeasured blocks later
first). The data's order wins only by scoring better. The paper ablates diffusion-transformer blocks with an
image-quality metric and then distils with early blocks frozen; here the metric is the job's KL, and the
distillation belongs to `posttrain`.
"""

from __future__ import annotations

import math

from search.adaptive import RoundByRound
from search.evolution import DEFAULT_STAGES
from search.genome import LevelSpace, PruneGenome
from search.strategy import Stage

GROUPS = ("attn", "mlp")


def blocks_removed(genome_levels: tuple[int, ...], top: int, n_layers: int) -> tuple[int, int]:
    """Whole blocks and left-over levels for a group whose levels sum to `sum(genome_levels)`."""
    whole, rest = divmod(sum(genome_levels), top)
    if whole >= n_layers:
        return n_layers, 0
    return whole, rest


def removal_genome(space: LevelSpace, start: PruneGenome, order: dict[str, list[int]]) -> PruneGenome:
    """The genome that removes whole blocks first in each group's `order` (layer indices, first removed first)
    until the start's level sum leaves less than a block, and puts the left-over levels, one per layer, on the
    remaining layers in the same order."""
    out = {}
    for group in GROUPS:
        top = space.attn_levels if group == "attn" else space.mlp_levels
        whole, rest = blocks_removed(getattr(start, group), top, space.n_layers)
        levels = [0] * space.n_layers
        for layer in order[group][:whole]:
            levels[layer] = top
        kept = order[group][whole:]
        for j in range(rest):  # fewer than `top` levels; more layers than that can take one each
            levels[kept[j % len(kept)]] += 1
        out[group] = tuple(levels)
    return PruneGenome(**out)


class BlockRemoval(RoundByRound):
    """Whole-block removal at the start's level sums: position prior against the ablation order (see the module).

    Args:
        space: the level space.
        start: the uniform cut; its level sums set the blocks removed.
        seed: the job seed (only the data seed depends on it).
        key: what tells this run from the job's other runs; part of ids and seeds.
        budget: evaluations at most (the ablations take what is left after the start and the two finals).
        stage: the settings every candidate is scored with.
    """

    name = "depth"

    def __init__(self, space: LevelSpace, start: PruneGenome, *, seed: int, key: int | str, budget: int,
                 stage: Stage = DEFAULT_STAGES[-1]):
        later_first = list(range(space.n_layers - 1, -1, -1))
        self._blocks = [(layer, group) for layer in later_first for group in GROUPS]
        self._prior = removal_genome(space, start, {g: later_first for g in GROUPS})
        self._ablations: list[tuple[int, str, PruneGenome]] = []
        self._phase = "ablate"
        super().__init__(space, start, seed=seed, key=key, budget=budget, stage=stage)

    def _ablated(self, layer: int, group: str) -> PruneGenome:
        dense = (0,) * self._space.n_layers
        levels = list(dense)
        levels[layer] = self._space.attn_levels if group == "attn" else self._space.mlp_levels
        return PruneGenome(**{"attn": dense, "mlp": dense, group: tuple(levels)})

    def data_order(self) -> dict[str, list[int]]:
        """Per group, layers by their ablation's KL increase (lowest first; unmeasured or failed ones last),
        the later layer first on ties."""
        measured = {(layer, group): self._fitness_of(g) for layer, group, g in self._ablations}

        def cost(layer: int, group: str) -> tuple[float, int]:
            value = measured.get((layer, group))
            return (math.inf if value is None else value, -layer)

        return {g: sorted(range(self._space.n_layers), key=lambda i, g=g: cost(i, g)) for g in GROUPS}

    def _next_round(self) -> list[tuple[PruneGenome, bool]]:
        if self._phase == "ablate":
            self._phase = "final"
            room = max(0, self._budget_left - 2)
            self._ablations = [(layer, group, self._ablated(layer, group)) for layer, group in self._blocks[:room]]
            if self._ablations:
                return [(g, False) for _, _, g in self._ablations]
        if self._phase == "final":
            self._phase = "done"
            return [(self._prior, True), (removal_genome(self._space, self._start, self.data_order()), True)]
        return []
