"""Fitness against cached teacher outputs: full KL(dense ‖ candidate), or KL on the teacher's top-k tokens.

The dense model's next-token log-probabilities over the fitness pool are computed once per evaluator and kept on
the CPU. A full table costs N·(T-1)·vocab floats; for large vocabularies `topk` keeps only the teacher's k most
likely tokens per position (as EvoPress's sparse KL does). Both distributions are then compared on k + 1
outcomes, the k tokens and "any other token": KL_k = Σ_top p_i log(p_i / q_i) + p_rest log(p_rest / q_rest).
That is a true KL (≥ 0, zero for the teacher itself), never above the full KL, and equal to it when at most
one token is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from workers import metrics


@dataclass(frozen=True)
class Teacher:
    """Cached teacher outputs for (N, T) tokens: full log-probs, or renormalised top-k log-probs and indices.

    Attributes:
        logprobs: (N, T-1, vocab) float32, or None when top-k.
        top_logprobs: (N, T-1, k) float32 log-probs of the teacher's top k tokens, or None.
        top_indices: (N, T-1, k) int64 token ids of the top k, or None.
    """

    logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_indices: torch.Tensor | None = None

    @classmethod
    def of(cls, model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8, topk: int | None = None) -> Teacher:
        """Run the dense `model` over `tokens` (N, T) once and keep what the KL needs."""
        full = metrics.teacher_logprobs(model, tokens, batch_size=batch_size)  # (N, T-1, vocab)
        if topk is None or topk >= full.shape[-1]:
            return cls(logprobs=full)
        values, indices = full.topk(topk, dim=-1)  # (N, T-1, k)
        return cls(top_logprobs=values, top_indices=indices)

    def select(self, rows: torch.Tensor) -> Teacher:
        """The teacher outputs of sequences `rows` (indices into N)."""
        pick = (lambda t: None if t is None else t[rows])  # noqa: E731
        return Teacher(pick(self.logprobs), pick(self.top_logprobs), pick(self.top_indices))

    @property
    def sequences(self) -> int:
        table = self.logprobs if self.logprobs is not None else self.top_logprobs
        return int(table.shape[0])


@torch.inference_mode()
def kl(model: nn.Module, tokens: torch.Tensor, teacher: Teacher, *, batch_size: int = 8) -> float:
    """Mean over predicted positions of KL(teacher ‖ model) in nats (top-k KL when the teacher is top-k)."""
    if teacher.logprobs is not None:
        return metrics.kl_to_teacher(model, tokens, teacher.logprobs, batch_size=batch_size)
    n, t = tokens.shape
    if teacher.top_logprobs.shape[:2] != (n, t - 1):
        raise ValueError(f"teacher top-k {tuple(teacher.top_logprobs.shape)} does not match tokens {(n, t)}")
    device = next(model.parameters()).device
    total = 0.0
    chunks = zip(
        tokens.split(batch_size), teacher.top_logprobs.split(batch_size), teacher.top_indices.split(batch_size),
        strict=True,
    )
    for chunk, top, index in chunks:
        logits = model(input_ids=chunk.to(device)).logits[:, :-1].float()  # (B, T-1, vocab)
        student = F.log_softmax(logits, dim=-1).gather(-1, index.to(device)).double()  # (B, T-1, k)
        top = top.to(device, torch.float64)
        total += _coarse_kl(top, student)
    return total / (n * (t - 1))


def _coarse_kl(top: torch.Tensor, student: torch.Tensor) -> float:
    """Sum over positions of KL on (top-k tokens, the rest), from log-probs (..., k) of both models."""
    p_rest = (1.0 - top.exp().sum(-1)).clamp_min(0.0)  # (...)
    q_rest = (1.0 - student.exp().sum(-1)).clamp_min(torch.finfo(torch.float64).tiny)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), 0.0)
    return float((top.exp() * (top - student)).sum() + rest.sum())


@torch.inference_mode()
def kl_and_perplexity(
    model: nn.Module, tokens: torch.Tensor, teacher: Teacher, *, batch_size: int = 8
) -> tuple[float, float]:
    """Full KL(teacher ‖ model) and the model's perplexity on (N, T) `tokens`, from one forward pass per batch."""
    if teacher.logprobs is None:
        raise ValueError("kl_and_perplexity needs a full teacher (no top-k)")
    n, t = tokens.shape
    device = next(model.parameters()).device
    kl_sum = nll_sum = 0.0
    for chunk, reference in zip(tokens.split(batch_size), teacher.logprobs.split(batch_size), strict=True):
        chunk = chunk.to(device)
        student = F.log_softmax(model(input_ids=chunk).logits[:, :-1].float(), dim=-1)  # (B, T-1, vocab)
        kl_sum += F.kl_div(student, reference.to(device), log_target=True, reduction="sum").item()
        nll_sum -= student.gather(-1, chunk[:, 1:, None]).sum().item()
    count = n * (t - 1)
    return kl_sum / count, math.exp(nll_sum / count)
