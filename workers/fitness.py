"""Fitness against cached teacher outputs: full KL(dense ‖ candidate), or KL on the teacher's top-k tokens.

The dense model's next-token log-probabilities over the fitness pool are computed once per evaluator and kept on
the CPU. A full table costs N·(T-1)·vocab floats; for large vocabularies `topk` keeps only the teacher's k most
likely tokens per position (as EvoPress's sparse KL does). Both distributions are then compared on k + 1
outcomes, the k tokens and "any other token": KL_k = Σ_top p_i log(p_i / q_i) + p_rest log(p_rest / q_rest).
That is a true KL (≥ 0, zero for the teacher itself), never above the full KL, and equal to it when at most
one token is left out.

Bytes kept per predicted position: 4·vocab for the full table, 12·k for top-k (fp32 value + int64 index). A job's
`search.kl_topk: auto` keeps the full table up to `AUTO_TOPK_VOCAB` tokens of vocabulary and the top
`AUTO_TOPK` above it: the default pools (2,048 fitness + 4,096 held-out tokens) then hold at most
6,144 · 4 · 65,536 B = 1.6 GB of full tables per evaluator (SmolLM2's 49,152: 1.2 GB), while a 152 k (Qwen2.5)
or 256 k (Gemma) vocabulary holds 6,144 · 12 · 256 B = 19 MB instead of 3.7 or 6.3 GB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from workers import metrics

AUTO_TOPK_VOCAB = 65_536  # `kl_topk: auto` keeps full tables up to this vocabulary size
AUTO_TOPK = 256  # and the teacher's top 256 tokens above it


def resolve_topk(setting: int | str | None, vocab_size: int) -> int | None:
    """The top-k a job scores KL on: `auto` -> None (full) up to `AUTO_TOPK_VOCAB`, else `AUTO_TOPK`; an int as
    given (None when it covers the vocabulary); None or "off" -> full."""
    if setting in (None, "off"):
        return None
    if setting == "auto":
        return AUTO_TOPK if vocab_size > AUTO_TOPK_VOCAB else None
    return None if int(setting) >= vocab_size else int(setting)


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
    def of(
        cls, model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8, topk: int | str | None = None
    ) -> Teacher:
        """Run the dense `model` over `tokens` (N, T) once and keep what the KL needs.

        `topk` is a job's `search.kl_topk` setting (see `resolve_topk`). With top-k, each batch's full log-probs
        are reduced on the model's device before the next batch, so the peak is one batch's (B, T-1, vocab)
        table, not the pool's.
        """
        topk = resolve_topk(topk, model.config.vocab_size)
        if topk is None:
            return cls(logprobs=metrics.teacher_logprobs(model, tokens, batch_size=batch_size))  # (N, T-1, vocab)
        values, indices = [], []
        with torch.inference_mode():
            for chunk in tokens.split(batch_size):
                top = metrics.next_token_logprobs(model, chunk).topk(topk, dim=-1)  # (B, T-1, k)
                values.append(top.values.cpu())
                indices.append(top.indices.cpu())
        return cls(top_logprobs=torch.cat(values), top_indices=torch.cat(indices))

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached outputs."""
        return sum(t.nbytes for t in (self.logprobs, self.top_logprobs, self.top_indices) if t is not None)

    def select(self, rows: torch.Tensor) -> Teacher:
        """The teacher outputs of sequences `rows` (indices into N)."""
        pick = (lambda t: None if t is None else t[rows])  # noqa: E731
        return Teacher(pick(self.logprobs), pick(self.top_logprobs), pick(self.top_indices))

    @property
    def sequences(self) -> int:
        table = self.logprobs if self.logprobs is not None else self.top_logprobs
        return int(table.shape[0])


def kl(model: nn.Module, tokens: torch.Tensor, teacher: Teacher, *, batch_size: int = 8,
       cache: Callable[[], object] | None = None) -> float:
    """Mean over the next-token predictions of every sequence (all positions but the last) of KL(teacher ‖ model)
    in nats (top-k KL when the teacher is top-k); `cache()` gives each batch's forward a fresh KV cache (a
    quantized one: K/V quantized inside the forward)."""
    return kl_and_perplexity(model, tokens, teacher, batch_size=batch_size, cache=cache)[0]


def _coarse_kl(top: torch.Tensor, student: torch.Tensor) -> float:
    """Sum over positions of KL on (top-k tokens, the rest), from log-probs (..., k) of both models."""
    p_rest = (1.0 - top.exp().sum(-1)).clamp_min(0.0)  # (...)
    q_rest = (1.0 - student.exp().sum(-1)).clamp_min(torch.finfo(torch.float64).tiny)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), 0.0)
    return float((top.exp() * (top - student)).sum() + rest.sum())


@torch.inference_mode()
def kl_and_perplexity(
    model: nn.Module, tokens: torch.Tensor, teacher: Teacher, *, batch_size: int = 8,
    cache: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """KL(teacher ‖ model) (top-k KL when the teacher is top-k) and the model's perplexity on (N, T) `tokens`,
    from one forward pass per batch; both averaged over every predicted position."""
    n, t = tokens.shape
    table = teacher.logprobs if teacher.logprobs is not None else teacher.top_logprobs
    if table.shape[:2] != (n, t - 1):
        raise ValueError(f"teacher outputs {tuple(table.shape)} do not match tokens {(n, t)}")
    device = next(model.parameters()).device
    kl_sum = nll_sum = 0.0
    for rows in torch.arange(n).split(batch_size):
        chunk = tokens[rows].to(device)
        forward = {} if cache is None else {"past_key_values": cache(), "use_cache": True}
        student = metrics.next_token_logprobs(model, chunk, **forward)  # (B, T-1, vocab)
        part = teacher.select(rows)
        if part.logprobs is not None:
            kl_sum += metrics.kl_sum(part.logprobs.to(device), student).item()
        else:
            picked = student.gather(-1, part.top_indices.to(device)).double()  # (B, T-1, k)
            kl_sum += _coarse_kl(part.top_logprobs.to(device, torch.float64), picked)
        nll_sum += metrics.nll_sum(student, chunk).item()
    count = n * (t - 1)
    return kl_sum / count, math.exp(nll_sum / count)
