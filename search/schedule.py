"""Selection schedules: how many survivors each stage keeps and how many tokens it scores them on."""

from __future__ import annotations

import math


def halving_schedule(offspring: int, pool_sequences: int) -> list[tuple[int, int]]:
    """Survivors and fitness sequences per stage, halving the field and doubling the data each stage.

    The last stage keeps one survivor and scores it on the whole pool, so every final-stage fitness is
    comparable (the front only holds final-stage values). DarwinLM's 16 offspring give survivors 8/4/2/1.

    Args:
        offspring: λ, the mutants drawn in the first stage.
        pool_sequences: calibration sequences available to score on.

    Returns:
        `(survivors, sequences)` per stage, in order.
    """
    if offspring < 1 or pool_sequences < 1:
        raise ValueError(f"need offspring >= 1 and pool_sequences >= 1, got {offspring}, {pool_sequences}")
    n_stages = max(1, math.ceil(math.log2(offspring)))
    stages = []
    for i in range(n_stages):
        survivors = max(1, offspring >> (i + 1))
        sequences = max(1, pool_sequences >> (n_stages - 1 - i))
        stages.append((survivors, sequences))
    stages[-1] = (1, pool_sequences)
    return stages

