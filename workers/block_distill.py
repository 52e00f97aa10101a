"""HierarchicalPrune's sensitivity-guided distillation (Kwon et al., AAAI'26), for post-training a candidate.

HierarchicalPrune measures each block's sensitivity by removing it and lets the sensitive blocks move least during
distillation (it freezes the early blocks, which set the semantics, and weights updates inversely to sensitivity).
Here, on the sliced candidate about to be trained:

* block sensitivity s_l = KL(candidate ‖ candidate with decoder block l's two residual branches removed), the mean
  per next-token prediction on a few calibration sequences (L + 1 forward passes);
* per-block weight w_l = min(cap, s̄ / s_l), s̄ the mean sensitivity of the trained blocks: a block of average
  sensitivity trains at the job's rate, one twice as sensitive at half of it; a block that barely matters gets
  `cap` without taking anything from the others. The first `freeze_early` blocks get 0 and do not train;
* the weight scales block l's learning rate. Under AdamW a weight on the block's loss gradient would cancel out
  (Adam normalises each parameter's step), so the learning rate is where a per-block weight takes effect.

What differs from the paper: it prunes and distils diffusion transformers (MMDiT) on images and measures quality
drops with its own metrics; for an LLM the quality drop is the KL, and the loss the candidate trains on stays the
job's `kd` (KL(dense ‖ candidate)).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from workers import fitness


@contextmanager
def without_block(model: nn.Module, index: int) -> Iterator[None]:
    """Remove decoder block `index`'s attention and MLP branches (their outputs zeroed) inside the block."""
    layer = model.model.layers[index]

    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    handles = [layer.self_attn.register_forward_hook(zero), layer.mlp.register_forward_hook(zero)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_sensitivities(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """s_l = KL(model ‖ model without block l) per decoder block, on `tokens` (N, T): (L,) float64."""
    teacher = fitness.Teacher.of(model, tokens, batch_size=batch_size)
    out = []
    for index in range(len(model.model.layers)):
        with without_block(model, index):
            out.append(fitness.kl(model, tokens, teacher, batch_size=batch_size))
    return torch.tensor(out, dtype=torch.float64)


def block_weights(sensitivities: torch.Tensor, *, cap: float = 4.0, freeze_early: int = 0) -> torch.Tensor:
    """w_l = min(cap, s̄ / s_l), s̄ the mean sensitivity over the trained blocks; 0 for the first `freeze_early`."""
    s = sensitivities.to(torch.float64)
    weights = torch.zeros_like(s)
    trained = s[min(freeze_early, len(s)):]
    if trained.numel():
        weights[len(s) - trained.numel():] = (trained.mean() / trained.clamp_min(1e-30)).clamp(max=cap)
    return weights


def param_groups(model: nn.Module, weights: torch.Tensor, lr: float) -> list[dict]:
    """AdamW parameter groups: block l's trainable parameters at lr·w_l, everything else at `lr`."""
    groups, in_blocks = [], set()
    for layer, weight in zip(model.model.layers, weights.tolist(), strict=True):
        params = [p for p in layer.parameters() if p.requires_grad]
        in_blocks.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": lr * weight, "block_weight": weight})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_blocks]
    return [{"params": rest, "lr": lr, "block_weight": 1.0}, *groups] if rest else groups


def make_optimizer(model: nn.Module, weights: torch.Tensor, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """A fresh AdamW whose per-block learning rates follow `weights`."""
    return torch.optim.AdamW(param_groups(model, weights, lr), lr=lr, weight_decay=weight_decay)
