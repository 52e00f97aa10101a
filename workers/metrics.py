"""Fitness metrics: next-token log-probabilities, the KL divergence between two models' distributions, perplexity.

Every position of a sequence except the last predicts the next token, so a batch of (N, T) tokens yields
N * (T - 1) predictions; all metrics average over those predictions with equal weight (`workers.fitness.kl` is
the KL over a pool of sequences, against cached teacher outputs).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def next_token_logprobs(model: nn.Module, batch: torch.Tensor, **forward) -> torch.Tensor:
    """(B, T-1, vocab) float32 log-probabilities of the next token of (B, T) `batch`, on the model's device;
    `forward` goes to the model's call (e.g. `past_key_values=` a quantized cache)."""
    logits = model(input_ids=batch.to(_device(model)), **forward).logits[:, :-1]  # (B, T-1, vocab)
    return F.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def teacher_logprobs(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probabilities of the next token at every position but the last.

    Args:
        model: the dense teacher.
        tokens: LongTensor (N, T).
        batch_size: sequences per forward pass.

    Returns:
        float32 tensor (N, T-1, vocab) on the CPU.
    """
    return torch.cat([next_token_logprobs(model, chunk).cpu() for chunk in tokens.split(batch_size)])


def kl_sum(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(teacher ‖ student) in nats, from both models' log-probabilities (..., vocab) at the
    same positions: the project's one KL, a 0-dim tensor, differentiable in `student`.

    Its callers divide by the positions they pass, so every KL reported is a mean over all positions of every
    sequence, with equal weight: the N·(T-1) next-token predictions of (N, T) tokens for the fitness, the KV
    search and distillation; all N·T positions for ablation scores, whose dense outputs need no next token.
    """
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def nll_sum(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Σ over predictions of the next token's negative log-likelihood, from `next_token_logprobs` of (B, T) tokens."""
    return -logprobs.gather(-1, tokens[:, 1:, None].to(logprobs.device)).sum()


@torch.inference_mode()
def mean_nll(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """Mean next-token negative log-likelihood over predicted positions, in nats."""
    n, t = tokens.shape
    total = 0.0
    for chunk in tokens.split(batch_size):
        total += nll_sum(next_token_logprobs(model, chunk), chunk).item()  # (B, T-1, vocab) log-probs
    return total / (n * (t - 1))


def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """exp of the mean next-token negative log-likelihood of (N, T) `tokens`."""
    return math.exp(mean_nll(model, tokens, batch_size))
