"""Measured latency of a (sliced) model, median of repeats after warm-up: one batch's forward pass
(`forward_latency`, what an export reports), or one decoding step with a given cache already holding a context
(`decode_latency`, a joint job's latency objective).

Wall time on the model's device, with whatever torch threads the calling process has; on a shared machine it is
noisy, which the median of a few repeats only tempers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
    ids = _token_ids(model, batch_size, seq_len, seed).to(device)  # (B, T)
    times = _timed(lambda i: model(input_ids=ids, use_cache=False), device, warmup=warmup, repeats=repeats)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats,
            "batch_size": batch_size, "seq_len": seq_len}


@torch.inference_mode()
def decode_latency(
    model: nn.Module, cache: Callable[[], object], *, batch_size: int = 1, context: int = 256, repeats: int = 5,
    warmup: int = 2, seed: int = 0,
) -> dict:
    """Time one decoding step of `model`: one new token for each of `batch_size` sequences, attending to a cache.

    A fresh `cache()` is filled with `context` random tokens per sequence by one untimed forward pass; then each
    step feeds one token, as `generate` does, so the cache holds `context + i` tokens at step i (warm-up steps
    first). Quantizing caches pay their packing inside the steps, as they do in `generate`.

    Args:
        model: a causal LM (its first parameter's device runs the batch).
        cache: makes the cache to decode with (e.g. a joint configuration's packed mixed-precision cache).
        batch_size: sequences decoded together.
        context: tokens in the cache before the first step.
        repeats: timed steps; the median is reported.
        warmup: untimed steps first.
        seed: the seed of the token ids.

    Returns:
        `median_ms`, `min_ms`, `repeats`, `batch_size`, `context`.
    """
    if repeats < 1 or batch_size < 1 or context < 1 or warmup < 0:
        raise ValueError(f"need repeats, batch_size, context >= 1 and warmup >= 0, got {repeats}, {batch_size}, "
                         f"{context}, {warmup}")
    device = next(model.parameters()).device
    ids = _token_ids(model, batch_size, context + warmup + repeats, seed).to(device)  # (B, context + steps)
    past = model(input_ids=ids[:, :context], past_key_values=cache(), use_cache=True).past_key_values

    def step(i: int) -> None:
        model(input_ids=ids[:, context + i: context + i + 1], past_key_values=past, use_cache=True)  # (B, 1)

    times = _timed(step, device, warmup=warmup, repeats=repeats)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats,
            "batch_size": batch_size, "context": context}


def _token_ids(model: nn.Module, batch_size: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.vocab_size, (batch_size, length), generator=generator)  # (B, length)


def _timed(run: Callable[[int], object], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of `run(i)` for i in 0 .. warmup + repeats - 1, the warm-up calls left out."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return times
