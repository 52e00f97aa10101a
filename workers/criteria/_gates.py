"""Per-unit multiplicative gates on o_proj / down_proj inputs, and the next-token cross-entropy target.

A gate m_u (= 1 dense, 0 = unit removed) scales the input columns of unit u: the r·h o_proj columns of a KV
group (h of a query head) or the down_proj column of a channel. Gates are plain forward pre-hooks, so one
implementation covers every Llama-family model. A gate vector of shape (B, n_units) gives per-sample gradients
from one backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from workers.criteria._common import Geometry, decoder_layers, model_device, target_linear

Gates = list[dict[str, torch.Tensor]]  # per layer, kind -> (n_units,) or (B, n_units)


def n_units(kind: str, geo: Geometry) -> int:
    """Units of `kind` per layer: attention units (KV groups or query heads) or MLP channels."""
    return geo.attn_units if kind == "attn" else geo.mlp_units


def ones(geo: Geometry, kinds: tuple[str, ...], batch: int | None = None, device=None, grad: bool = False) -> Gates:
    """Dense gates (all ones) for every layer; per-sample (batch, n) when `batch` is given."""

    def one(kind: str) -> torch.Tensor:
        shape = (n_units(kind, geo),) if batch is None else (batch, n_units(kind, geo))
        return torch.ones(shape, dtype=torch.float64, device=device, requires_grad=grad)

    return [{kind: one(kind) for kind in kinds} for _ in range(geo.n_layers)]


@contextmanager
def gated(model: nn.Module, gates: Gates) -> Iterator[Gates]:
    """Scale every gated linear's input columns by its gates while the context is open.

    A unit's columns are the linear's inputs divided evenly among the gates, so the gates' length says what a
    unit is (a KV group or a query head).
    """
    handles = []

    def hook(m: torch.Tensor):
        def scale(module, args):
            x = args[0]  # (B, T, C)
            width = module.in_features // m.shape[-1]
            g = m.to(x.dtype).repeat_interleave(width, dim=-1)  # (C,) or (B, C)
            return (x * (g.unsqueeze(-2) if g.dim() == 2 else g),) + tuple(args[1:])

        return scale

    for layer, per_kind in zip(decoder_layers(model), gates, strict=True):
        for kind, m in per_kind.items():
            handles.append(target_linear(layer, kind).register_forward_pre_hook(hook(m)))
    try:
        yield gates
    finally:
        for h in handles:
            h.remove()


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Switch off weight gradients (gates alone need them); restores every flag on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, T, vocab), at least fp32."""
    out = model(input_ids=ids.to(model_device(model)), use_cache=False).logits  # (B, T, vocab)
    return out.to(torch.promote_types(out.dtype, torch.float32))


def sample_ce(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over each sequence's T-1 predictions, (B,)."""
    return ce_of(ids, logits(model, ids))


def ce_of(ids: torch.Tensor, all_logits: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed next-token CE (B,) of `all_logits` (B, T, vocab) for token ids (B, T)."""
    lg = all_logits[:, :-1]  # (B, T-1, vocab)
    target = ids[:, 1:].to(lg.device)
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="none")
    return ce.reshape(target.shape).sum(1)


def predictions(calibration: torch.Tensor) -> int:
    """How many next-token predictions the CE target averages over."""
    return calibration.shape[0] * (calibration.shape[1] - 1)
