"""The level-switch mutation of EvoPress / DarwinLM, and the offspring of one parent.

A switch raises one layer's level by one step and lowers a different layer's level by one step in the same
group (attention or MLP). Every step of a group costs the same number of parameters, so a switch keeps the
level sum of each group, and with it the parameter count, exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

from darwinfront.core.errors import InvalidSpec
from search.genome import LevelSpace, PruneGenome

Mutation = Callable[[PruneGenome, LevelSpace, random.Random], PruneGenome]

# Genomes the exhaustive fallback of `offspring` may visit before it gives up on a huge neighbourhood.
_NEIGHBOURHOOD_LIMIT = 20_000


def switch_count(rng: random.Random, max_switches: int) -> int:
    """`min(U{1,max}, U{1,max})`: for max 3, P(1, 2, 3) = 5/9, 3/9, 1/9 (small moves favoured)."""
    if max_switches < 1:
        raise ValueError(f"max_switches must be >= 1, got {max_switches}")
    return min(rng.randint(1, max_switches), rng.randint(1, max_switches))


def level_switch(
    parent: PruneGenome,
    space: LevelSpace,
    rng: random.Random,
    *,
    max_switches: int = 3,
    implant_rate: float = 0.25,
    prior: Sequence[float] | None = None,
) -> PruneGenome:
    """Apply `switch_count(rng, max_switches)` level switches to `parent`.

    Each switch picks a group with probability proportional to its number of levels (falling back to the
    other group when the picked one has no legal switch), then one layer whose level can go up and a
    different layer whose level can go down, and moves one step from the second to the first. Successive
    switches may undo each other, so the result can equal `parent`; `offspring` rejects such copies.

    In a space with neural implants (`LevelSpace.implant_levels`), each move is instead, with probability
    `implant_rate`, an implant flip: one layer whose level allows it turns its sub-layer into an implant or back
    (the count stays). Implants a switch moves to a level without one are dropped. A space without implants
    draws exactly what it drew before implants existed.

    With `prior` (a positive weight per layer, `layer_prior`), the layer to prune more is drawn with
    probability proportional to its weight among the legal ones, and the layer to prune less proportional to
    the inverse weight; without it, both uniformly.

    Raises:
        InvalidSpec: `parent` does not fit `space`, or neither group has a legal switch (every layer of
            both groups at 0, or every layer at its top level, or a single layer).
    """
    space.check(parent)
    levels = {"attn": list(parent.attn), "mlp": list(parent.mlp)}
    tops = {"attn": space.attn_levels, "mlp": space.mlp_levels}
    implants = set(parent.implants)
    for _ in range(switch_count(rng, max_switches)):
        if space.has_implants and rng.random() < implant_rate:
            here = PruneGenome(tuple(levels["attn"]), tuple(levels["mlp"]))
            slots = space.implant_slots(here)
            if slots:
                implants ^= {rng.choice(slots)}
                continue
        first = "attn" if rng.random() * (space.attn_levels + space.mlp_levels) < space.attn_levels else "mlp"
        for group in (first, "mlp" if first == "attn" else "attn"):
            if _switch_in_group(levels[group], tops[group], rng, prior):
                break
        else:
            raise InvalidSpec("genome", f"no legal level switch in {parent.key()}")
    return space.settle(PruneGenome(attn=tuple(levels["attn"]), mlp=tuple(levels["mlp"]), implants=tuple(implants)))


def _switch_in_group(levels: list[int], top: int, rng: random.Random, prior: Sequence[float] | None) -> bool:
    downs = [j for j, level in enumerate(levels) if level > 0]
    # a raisable layer needs some other layer to lower: any, unless it is the only lowerable one
    ups = [i for i, level in enumerate(levels) if level < top and (len(downs) > 1 or downs not in ([], [i]))]
    if not ups:
        return False
    if prior is None:
        up = rng.choice(ups)
        down = rng.choice([j for j in downs if j != up])
    else:
        up = rng.choices(ups, weights=[prior[i] for i in ups])[0]
        others = [j for j in downs if j != up]
        down = rng.choices(others, weights=[1.0 / prior[j] for j in others])[0]
    levels[up] += 1
    levels[down] -= 1
    return True


def layer_prior(n_layers: int, strength: float) -> list[float]:
    """HierarchicalPrune's early-layer protection as switch weights: layer i weighs `exp(strength * i / (n - 1))`.

    Under `level_switch(prior=...)` the last layer is `exp(strength)` times likelier than the first to be
    pruned more, and the first that much likelier to be pruned less; strength 0 is the uniform draw.
    """
    if n_layers < 1 or strength < 0:
        raise ValueError(f"need n_layers >= 1 and strength >= 0, got {n_layers}, {strength}")
    return [math.exp(strength * i / max(1, n_layers - 1)) for i in range(n_layers)]


def early_layer_protection(strength: float) -> Mutation:
    """The level switch under `layer_prior(n_layers, strength)` (strength 0: the plain `level_switch`)."""
    if strength == 0:
        return level_switch

    def mutate(parent: PruneGenome, space: LevelSpace, rng: random.Random) -> PruneGenome:
        return level_switch(parent, space, rng, prior=layer_prior(space.n_layers, strength))

    return mutate


def offspring(
    parent: PruneGenome,
    space: LevelSpace,
    rng: random.Random,
    n: int,
    *,
    seen: set[str],
    mutate: Mutation | None = None,
    max_switches: int = 3,
) -> list[PruneGenome]:
    """Up to `n` distinct mutants of `parent`, none equal to it and none whose `key()` is in `seen`.

    Draws at most `20 * n + 100` mutants. When that is not enough (a small or well-explored space) and the
    mutation is the default level switch, every genome within `max_switches` switches of `parent` is listed
    (up to 20,000 of them) and the missing ones are drawn from that list, so a short answer means that no
    more exist. `seen` is not modified.

    Args:
        parent: the genome to mutate.
        space: the level space `parent` lives in.
        rng: the only source of randomness.
        n: mutants wanted.
        seen: keys of genomes to avoid (for example everything evaluated so far in this run).
        mutate: `mutate(parent, space, rng) -> genome`; None or `level_switch` means `level_switch` with
            `max_switches`.
        max_switches: the switch limit of the default mutation and of the exhaustive fallback.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    default = mutate is None or mutate is level_switch
    if default:

        def mutate(genome: PruneGenome, space: LevelSpace, rng: random.Random) -> PruneGenome:
            return level_switch(genome, space, rng, max_switches=max_switches)

    taken = set(seen) | {parent.key()}
    children: list[PruneGenome] = []
    for _ in range(20 * n + 100):
        if len(children) == n:
            return children
        child = mutate(parent, space, rng)
        if child.key() not in taken:
            taken.add(child.key())
            children.append(child)
    if default and len(children) < n:
        rest = [g for g in neighbourhood(parent, space, max_switches) if g.key() not in taken]
        children.extend(rng.sample(rest, min(n - len(children), len(rest))))
    return children


def neighbourhood(parent: PruneGenome, space: LevelSpace, max_switches: int = 3) -> list[PruneGenome]:
    """The genomes reachable from `parent` in 1..`max_switches` switches, `parent` excluded.

    Listed breadth-first (nearest first) in a deterministic order, and cut at 20,000 genomes.
    """
    space.check(parent)
    found = {parent.key(): parent}
    frontier = [parent]
    for _ in range(max_switches):
        next_frontier = []
        for genome in frontier:
            for neighbour in single_switches(genome, space):
                if neighbour.key() not in found:
                    found[neighbour.key()] = neighbour
                    next_frontier.append(neighbour)
                    if len(found) > _NEIGHBOURHOOD_LIMIT:
                        return list(found.values())[1:]
        frontier = next_frontier
    return list(found.values())[1:]


def single_switches(genome: PruneGenome, space: LevelSpace) -> Iterator[PruneGenome]:
    """Every genome one legal switch away from `genome`, attention switches first."""
    for group, top in (("attn", space.attn_levels), ("mlp", space.mlp_levels)):
        levels = getattr(genome, group)
        for up, up_level in enumerate(levels):
            if up_level >= top:
                continue
            for down, down_level in enumerate(levels):
                if down == up or down_level == 0:
                    continue
                moved = list(levels)
                moved[up] += 1
                moved[down] -= 1
                yield space.settle(PruneGenome(**{"attn": genome.attn, "mlp": genome.mlp, group: tuple(moved),
                                                  "implants": genome.implants}))
    for slot in space.implant_slots(genome):  # implant flips (spaces with implants only)
        yield PruneGenome(genome.attn, genome.mlp, tuple(set(genome.implants) ^ {slot}))
