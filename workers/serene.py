"""SeReNe's neuron-sensitivity regulariser (Tartaglione et al., TNNLS'21), for training a (sliced) candidate.

A unit is an MLP channel (its gate_proj and up_proj rows and down_proj column) or a KV group of a regularly
grouped attention (its q/k/v rows and o_proj columns); row biases count with their rows. Per training step:

* sensitivity S_n = mean over the batch's tokens of Σ_{columns c of n} |∂L/∂a_c|, with a the input of o_proj /
  down_proj (the unit's output, what the `gate` criterion gates). This is the paper's "lower bound" variant:
  one backward of the loss instead of one backward per output (infeasible for a 50k-token vocabulary);
* insensitivity S̄_n = ReLU(1 − S_n / (τ · mean_m S_m)), the mean over the units of the same layer and kind. The
  paper uses ReLU(1 − S_n) with an absolute S; relative to the layer's mean, one τ fits every layer and model;
* after the optimiser's step, w_n ← w_n − λ·S̄_n·w_n: the decoupled gradient step of the regulariser
  R = ½ λ Σ_n S̄_n ‖w_n‖² with S̄ held fixed (as the paper updates it, beside the optimiser, not through Adam).

Units the data do not need shrink geometrically; `cut_shrunk` then names the units whose weights fell below a
fraction of their norm before training (the paper's magnitude threshold), for `slicing.cut_further`.
Attention with an uneven query-to-KV grouping (`q_head` cuts) is left alone: its units share K/V heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class Part:
    """One tensor of a unit family: unit n holds `width` consecutive entries along `dim`."""

    tensor: torch.Tensor
    dim: int
    width: int


def unit_parts(layer: nn.Module, kind: str) -> tuple[nn.Linear, list[Part]] | None:
    """The linear whose input is the units' output (o_proj / down_proj) and the tensors the units span, or None
    when the sub-layer has no regulable units (removed, an implant, or attention with uneven grouping)."""
    block = layer.self_attn if kind == "attn" else layer.mlp
    if getattr(block, "darwinfront_empty", False):
        return None
    if kind == "mlp":
        rows = [block.gate_proj, block.up_proj] if hasattr(block, "gate_proj") else [block.up_proj]  # (GPT-NeoX)
        linears, width, target = [(linear, 1) for linear in rows], 1, block.down_proj
    else:
        if getattr(block, "kv_head_of_query", None) is not None:
            return None
        h = block.head_dim
        groups = block.k_proj.out_features // h
        width = block.q_proj.out_features // groups  # query rows (and o_proj columns) per KV group
        linears, target = [(block.q_proj, width), (block.k_proj, h), (block.v_proj, h)], block.o_proj
    parts = [Part(lin.weight, 0, w) for lin, w in linears]
    parts += [Part(lin.bias, 0, w) for lin, w in linears if isinstance(lin.bias, nn.Parameter)]
    return target, [*parts, Part(target.weight, 1, width)]


def _per_unit(part: Part, values: torch.Tensor) -> torch.Tensor:
    """Sum `values` (shaped like part.tensor) into one number per unit: (n_units,)."""
    if values.dim() == 2:
        values = values.sum(1 - part.dim)
    return values.reshape(-1, part.width).sum(1)


def norms_squared(layer: nn.Module, kind: str) -> torch.Tensor | None:
    """‖w_n‖² of every unit of the sub-layer (float64), or None when it has no regulable units."""
    found = unit_parts(layer, kind)
    if found is None:
        return None
    return sum(_per_unit(p, p.tensor.detach().double() ** 2) for p in found[1])


def penalty(layer: nn.Module, kind: str, insensitivity: torch.Tensor) -> torch.Tensor:
    """R = ½ Σ_n S̄_n ‖w_n‖² of one sub-layer, differentiable in its weights (S̄ held fixed)."""
    _, parts = unit_parts(layer, kind)
    bar = insensitivity.detach()
    return 0.5 * sum((bar.to(p.tensor) * _per_unit(p, p.tensor**2)).sum() for p in parts)


class Serene:
    """The regulariser on every regulable unit of `model`: `watch()` around the loss's backward gathers the
    sensitivities, `shrink()` after the optimiser's step applies the update.

    Args:
        model: a causal LM, dense or sliced.
        strength: λ, the fraction of an entirely insensitive unit's weights removed per step.
        threshold: τ: a unit below τ times its layer's mean sensitivity is shrunk, the further below the more.
    """

    def __init__(self, model: nn.Module, strength: float, threshold: float = 1.0):
        if not 0.0 < strength < 1.0 or threshold <= 0.0:
            raise ValueError(f"SeReNe needs 0 < strength < 1 and threshold > 0, got {strength}, {threshold}")
        self.model, self.strength, self.threshold = model, strength, threshold
        self.layers = list(model.model.layers)
        self._sums: dict[tuple[int, str], torch.Tensor] = {}
        self._tokens: dict[tuple[int, str], int] = {}

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Record |∂L/∂a| of every unit's output during the backward passes run inside the block."""
        self._sums, self._tokens = {}, {}
        handles = []
        for i, layer in enumerate(self.layers):
            for kind in KINDS:
                found = unit_parts(layer, kind)
                if found is not None:
                    width = found[1][-1].width
                    handles.append(found[0].register_forward_pre_hook(self._hook((i, kind), width)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, key: tuple[int, str], width: int):
        def pre(module, args):
            x = args[0]  # (B, T, units * width)
            if x.requires_grad:
                x.register_hook(lambda g: self._add(key, g, width))

        return pre

    def _add(self, key: tuple[int, str], grad: torch.Tensor, width: int) -> None:
        per_token = grad.detach().abs().double().reshape(-1, grad.shape[-1] // width, width).sum(2)  # (tokens, n)
        self._sums[key] = self._sums.get(key, 0) + per_token.sum(0)
        self._tokens[key] = self._tokens.get(key, 0) + per_token.shape[0]

    def sensitivities(self) -> dict[tuple[int, str], torch.Tensor]:
        """(layer, kind) -> S (n_units,): mean |∂L/∂a| per unit over the tokens of the last watched backward."""
        return {key: total / self._tokens[key] for key, total in self._sums.items()}

    def insensitivities(self) -> dict[tuple[int, str], torch.Tensor]:
        """(layer, kind) -> S̄ = ReLU(1 − S / (τ · mean S)) (n_units,)."""
        out = {}
        for key, s in self.sensitivities().items():
            out[key] = torch.relu(1.0 - s / (self.threshold * s.mean().clamp_min(1e-30)))
        return out

    @torch.no_grad()
    def shrink(self) -> dict[tuple[int, str], torch.Tensor]:
        """w_n ← (1 − λ S̄_n) w_n for every unit seen in the last watched backward; returns the S̄ applied."""
        bars = self.insensitivities()
        for (i, kind), bar in bars.items():
            factor = 1.0 - self.strength * bar  # (n_units,)
            for part in unit_parts(self.layers[i], kind)[1]:
                f = factor.to(part.tensor).repeat_interleave(part.width)
                part.tensor.mul_(f if part.tensor.dim() == 1 else f[:, None] if part.dim == 0 else f[None, :])
        return bars


def unit_norms(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, kind) -> ‖w_n‖ of every regulable unit of `model`."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for kind in KINDS:
            squared = norms_squared(layer, kind)
            if squared is not None:
                out[(i, kind)] = squared.sqrt()
    return out


def cut_shrunk(before: dict[tuple[int, str], torch.Tensor], after: dict[tuple[int, str], torch.Tensor],
               ratio: float) -> dict[tuple[int, str], list[int]]:
    """(layer, kind) -> the units (indices in the trained model) whose norm fell below `ratio` of what it was."""
    out = {}
    for key, norm in after.items():
        if key in before and before[key].shape == norm.shape:
            gone = (norm < ratio * before[key]).nonzero().flatten().tolist()
            if gone:
                out[key] = gone
    return out
