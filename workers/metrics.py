"""Fitness metrics: KL divergence to the dense teacher's next-token distributions, and perplexity.

Every position of a sequence except the last predicts the next token, so a batch of (N, T) tokens yields
N * (T - 1) predictions; all metrics average over those predictions with equal weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def next_token_logprobs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(B, T-1, vocab) float32 log-probabilities of the next token of (B, T) `batch`, on the model's device."""
    logits = model(input_ids=batch.to(_device(model))).logits[:, :-1]  # (B, T-1, vocab)
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


@torch.inference_mode()
def kl_to_teacher(model: nn.Module, tokens: torch.Tensor, teacher_logprobs: torch.Tensor, batch_size: int) -> float:
    """Mean over predicted positions of KL(teacher || model), in nats.

    Args:
        model: the student (a pruned model).
        tokens: LongTensor (N, T), the tokens the teacher saw.
        teacher_logprobs: (N, T-1, vocab), as `teacher_logprobs` returned them.
        batch_size: sequences per forward pass.
    """
    n, t = tokens.shape
    if teacher_logprobs.shape[:2] != (n, t - 1):
        raise ValueError(f"teacher log-probs {tuple(teacher_logprobs.shape)} do not match tokens {(n, t)}")
    total = 0.0
    for chunk, teacher in zip(tokens.split(batch_size), teacher_logprobs.split(batch_size), strict=True):
        student = next_token_logprobs(model, chunk)  # (B, T-1, vocab)
        teacher = teacher.to(student.device, torch.float32)
        total += F.kl_div(student, teacher, log_target=True, reduction="sum").item()
    return total / (n * (t - 1))


@torch.inference_mode()
def mean_nll(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """Mean next-token negative log-likelihood over predicted positions, in nats."""
    n, t = tokens.shape
    total = 0.0
    for chunk in tokens.split(batch_size):
        logp = next_token_logprobs(model, chunk)  # (B, T-1, vocab)
        targets = chunk[:, 1:].to(logp.device)  # (B, T-1)
        total -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
    return total / (n * (t - 1))


def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """exp of the mean next-token negative log-likelihood of (N, T) `tokens`."""
    return math.exp(mean_nll(model, tokens, batch_size))
