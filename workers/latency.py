"""Measured forward latency of a (sliced) model: the wall time of one batch's forward pass, median of repeats."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def forward_latency(
    model: nn.Module, *, batch_size: int = 1, seq_len: int = 128, repeats: int = 10, warmup: int = 2, seed: int = 0
) -> dict:
    """Time `model`'s forward pass on a fixed random batch of token ids.

    Args:
        model: a causal LM (its first parameter's device runs the batch).
        batch_size: sequences per forward pass.
        seq_len: tokens per sequence.
        repeats: timed passes; the median is reported.
        warmup: untimed passes first.
        seed: the seed of the token ids.

    Returns:
        `median_ms`, `min_ms`, `repeats`, `batch_size`, `seq_len`.
    """
    if repeats < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError(f"need repeats, batch_size and seq_len >= 1, got {repeats}, {batch_size}, {seq_len}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)  # (B, T)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats,
            "batch_size": batch_size, "seq_len": seq_len}
