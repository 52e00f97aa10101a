"""NIRVANA's calibration selection (`data.selection: kl`): of several seeded draws of the level database's
sequences, keep the one whose pruned model stays closest to the dense model.

For each draw the job's criterion scores the units on it, the uniform cut at `data.selection_sparsity` takes the
lowest-scored units (masks, no weight updates), and KL(dense ‖ cut) is measured on the fitness pool; the draw
with the lowest KL becomes the database pool, which every criterion then scores on and every candidate of the
search is cut from. NIRVANA measures the KL on held-out text; here the held-out pool stays unseen (it gives the
reported figures), so the fitness pool, which the search measures candidates on, is the yardstick. The draws and
the choice depend only on the model, the data section, the criterion and the seed, so a configuration's level
database rebuilds to the same tokens (`workers.configuration.rebuild`).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from search.seeding import derive_seed
from workers import fitness, levels, slicing


def draws(pool_size: int, *, count: int, size: int, seed: int) -> list[list[int]]:
    """`count` seeded draws of `size` rows each of a pool of `pool_size` sequences: distinct rows within a draw,
    in pool order (draw k from `derive_seed(seed, "kl-selection", k)`)."""
    if not 1 <= size <= pool_size:
        raise ValueError(f"a draw of {size} sequences does not fit a pool of {pool_size}")
    return [sorted(random.Random(derive_seed(seed, "kl-selection", k)).sample(range(pool_size), size))
            for k in range(count)]


def rows_of(pool: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The sequences `rows` of `pool` (N, T), (len(rows), T)."""
    return pool[torch.tensor(rows, dtype=torch.long, device=pool.device)]


@torch.no_grad()
def kl_of_draws(model: nn.Module, candidates: list[torch.Tensor], measure: torch.Tensor, *, criterion,
                table: levels.LevelTable, sparsity: float) -> list[float]:
    """KL(dense ‖ uniform cut at `sparsity`) on `measure` (N, T), the cut's units chosen by `criterion` on each
    candidate draw."""
    teacher = fitness.Teacher.of(model, measure, topk=None)
    genome = levels.level_space(model, table).uniform(sparsity)
    kls = []
    for tokens in candidates:
        orders = levels.removal_orders(criterion.score(model, tokens))
        with slicing.masked(model, levels.layout(genome, orders, table)) as cut:
            kls.append(fitness.kl(cut, measure, teacher))
    return kls


def select(model: nn.Module, pool: torch.Tensor, measure: torch.Tensor, *, count: int, size: int, seed: int,
           criterion, table: levels.LevelTable, sparsity: float) -> dict:
    """The draw of `size` sequences from `pool` (N, T) with the lowest KL (ties: the earlier draw), as a JSON-safe
    record: `{"rows": [...], "kls": [...], "chosen": k}` (`rows_of(pool, record["rows"])` gives the tokens)."""
    candidates = draws(pool.shape[0], count=count, size=size, seed=seed)
    kls = kl_of_draws(model, [rows_of(pool, rows) for rows in candidates], measure, criterion=criterion,
                      table=table, sparsity=sparsity)
    chosen = min(range(len(kls)), key=lambda k: (kls[k], k))
    return {"rows": candidates[chosen], "kls": kls, "chosen": chosen}
