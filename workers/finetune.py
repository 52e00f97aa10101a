"""Light training of a candidate before it is scored: DarwinLM's training-aware selection.

Every candidate of a stage trains on the same minibatches (drawn from the training pool with the stage's seed),
with a fresh AdamW, starting from the database weights. The candidate is the physically sliced model
(`workers.candidate`), so pruned structures stay exactly pruned: they do not exist (DarwinLM's released code
leaves them free to drift). A candidate shares the dense model's embeddings and norms;
`Snapshot` keeps those once per evaluator and puts them back after each candidate.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from workers import metrics, serene


@dataclass(frozen=True)
class TrainSettings:
    """How a candidate is trained: AdamW with `lr`, `batch_size` sequences per step, plain next-token loss.

    `weight_decay` 0.01 and default betas are torch's AdamW defaults, as in DarwinLM; the rate is raised
    from DarwinLM's 1e-5, which does nothing in a few steps on a small model (darwinlm.md §8.6).
    """

    lr: float = 3e-4
    batch_size: int = 8
    weight_decay: float = 0.01
    serene_strength: float = 0.0  # SeReNe's λ (`workers.serene`); 0: no regulariser
    serene_threshold: float = 1.0  # SeReNe's τ

    def regulariser(self, model: nn.Module) -> serene.Serene | None:
        """SeReNe's regulariser on `model` when these settings ask for it."""
        return serene.Serene(model, self.serene_strength, self.serene_threshold) if self.serene_strength else None


def light_training(prune) -> TrainSettings:
    """The light-training settings of a job's prune section (`darwinfront.core.spec.PruneSpec`)."""
    regulariser = prune.train_serene
    return TrainSettings(lr=prune.train_lr, batch_size=prune.train_batch_size,
                         serene_strength=regulariser.strength if regulariser else 0.0,
                         serene_threshold=regulariser.threshold if regulariser else 1.0)


def stage_batches(pool: torch.Tensor, tokens: int, seed: int, batch_size: int) -> list[torch.Tensor]:
    """The stage's training minibatches: `ceil(tokens / T)` sequences of `pool` (N, T), drawn with `seed`.

    Sequences are drawn without replacement (all of the pool, shuffled, when it is smaller) and cut into
    batches of `batch_size`; the same `seed` gives the same batches to every candidate of the stage.
    """
    if tokens <= 0 or pool.numel() == 0:
        return []
    n, t = pool.shape
    wanted = min(n, math.ceil(tokens / t))
    generator = torch.Generator().manual_seed(seed % (2**63))
    rows = torch.randperm(n, generator=generator)[:wanted]
    return list(pool[rows].split(batch_size))  # each (B, T)


class Snapshot:
    """A copy of `params`' values, taken once, to restore after every candidate (no model deepcopy)."""

    def __init__(self, params: Sequence[nn.Parameter]):
        self.params = list(params)
        self.values = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self) -> None:
        for param, value in zip(self.params, self.values, strict=True):
            param.copy_(value)


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """A fresh AdamW over the trainable parameters of `model`."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    teacher: torch.Tensor | None = None,
    regulariser: serene.Serene | None = None,
) -> float:
    """One optimiser step on `batch` (B, T); returns the loss before the step.

    `teacher` None trains on next-token cross-entropy, else on the mean KL(teacher ‖ model) per position with
    `teacher` the dense model's next-token log-probs (B, T-1, vocab). With `regulariser` (SeReNe) the step's
    unit sensitivities are gathered during the backward and the insensitive units shrunk after the step.
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    with regulariser.watch() if regulariser is not None else contextlib.nullcontext():
        if teacher is None:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            student = F.log_softmax(model(input_ids=batch).logits[:, :-1].float(), dim=-1)  # (B, T-1, vocab)
            target = teacher.to(device, torch.float32)
            loss = metrics.kl_sum(target, student) / target.shape[:2].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    optimizer.step()
    if regulariser is not None:
        regulariser.shrink()
    return loss.item()


def finetune(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    settings: TrainSettings,
    teacher: Sequence[torch.Tensor] | None = None,
) -> dict:
    """Train `model` in place, one AdamW step per batch over all its trainable parameters.

    Args:
        model: a causal LM holding the candidate's weights (a sliced candidate, or any model).
        batches: token ids, each (B, T).
        settings: optimiser settings.
        teacher: None for next-token cross-entropy (DarwinLM), or the dense model's next-token log-probs per
            batch, each (B, T-1, vocab), to distil: the loss is then the mean KL(teacher ‖ model) per position.

    Returns:
        `steps`, `first_loss`, `last_loss` and `seconds`.
    """
    start = time.perf_counter()
    optimizer = make_optimizer(model, settings)
    regulariser = settings.regulariser(model)
    losses = []
    model.train()
    try:
        for step, batch in enumerate(batches):
            losses.append(train_step(model, optimizer, batch, None if teacher is None else teacher[step],
                                     regulariser))
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
    return {
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": time.perf_counter() - start,
    }
