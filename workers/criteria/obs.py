"""ZipLM / OBS structured pruning: greedy removal of o_proj / down_proj input-column groups, with updates.

For a linear y = W x with calibration inputs X, H = XᵀX (dampened by rel_damp·mean(diag H)). A group g of
columns costs w_gᵀ (Hinv_gg)⁻¹ w_g summed over rows to remove when the other columns are refitted optimally;
the cheapest group goes first, the remaining columns get the OBS update W -= W_g (Hinv_gg)⁻¹ Hinv_g:, and Hinv
is downdated to the inverse over the remaining columns. One greedy pass yields every level, nested.

`Obs.score` turns the removal order into scores (first removed = 0, higher = keep); `obs_levels` returns, per
layer, the removal order and the updated weights at requested removal counts (the level database's source).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.criteria._common import (
    KINDS,
    Geometry,
    check_kinds,
    decoder_layers,
    empty,
    input_stats,
    target_linear,
)
from workers.criteria.base import LayerScores, UnitScores


@dataclass(frozen=True)
class ObsLevels:
    """One linear's greedy OBS result.

    Attributes:
        order: unit indices in removal order (the first `max(counts)` removed units).
        weights: removal count -> full-size updated weight (out, in) with the removed units' columns zero.
    """

    order: torch.Tensor
    weights: dict[int, torch.Tensor]


def _prepare(
    weight: torch.Tensor, hessian: torch.Tensor, rel_damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().to(device=hessian.device, dtype=torch.float64).clone()  # (out, in)
    h = hessian.to(torch.float64).clone()  # (in, in)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # a column that never sees input is free to remove: zero it, keep H invertible
    w[:, dead] = 0.0
    h.diagonal().add_(rel_damp * h.diagonal().mean())
    return w, torch.cholesky_inverse(torch.linalg.cholesky(h))


def _group_costs(w: torch.Tensor, hinv: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Removal cost of every group and the inverses of Hinv's diagonal blocks, (n,) and (n, group, group)."""
    n = w.shape[1] // group
    if group == 1:
        binv = (1.0 / hinv.diagonal()).reshape(n, 1, 1)
        return (w * w).sum(0) * binv.reshape(n), binv
    blocks = hinv.reshape(n, group, n, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n, g, g)
    binv = torch.linalg.inv(blocks)
    wg = w.reshape(w.shape[0], n, group)  # (out, n, g)
    return torch.einsum("ong,ngh,onh->n", wg, binv, wg), binv


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group: int,
    counts: Sequence[int],
    rel_damp: float = 1e-2,
) -> ObsLevels:
    """Greedy OBS removal of `group`-wide column blocks of `weight` (out, in) given input Gram `hessian`.

    Runs until max(counts) groups are removed and snapshots the updated weight at every count in `counts`.
    """
    n = weight.shape[1] // group
    if weight.shape[1] != n * group or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"weight {tuple(weight.shape)} / hessian {tuple(hessian.shape)} / group {group} mismatch"
        )
    if any(not 0 <= c <= n for c in counts):
        raise ValueError(f"removal counts {list(counts)} outside 0..{n}")
    w, hinv = _prepare(weight, hessian, rel_damp)
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    order: list[int] = []
    snaps: dict[int, torch.Tensor] = {}
    eye = torch.eye(group, dtype=w.dtype, device=w.device)
    for step in range(1, max(counts, default=0) + 1):
        cost, binv = _group_costs(w, hinv, group)
        u = int(torch.where(alive, cost, torch.inf).argmin())
        cols = slice(u * group, (u + 1) * group)
        m = binv[u]  # (g, g) = (Hinv_gg)⁻¹
        w -= w[:, cols] @ m @ hinv[cols, :]
        hinv -= hinv[:, cols] @ m @ hinv[cols, :]
        w[:, cols] = 0.0  # exactly zero (the update leaves rounding residue)
        hinv[cols, :] = 0.0
        hinv[:, cols] = 0.0
        hinv[cols, cols] = eye  # keeps the removed block invertible; its cost is masked anyway
        alive[u] = False
        order.append(u)
        if step in counts:
            snaps[step] = w.clone()
    snaps[0] = weight.detach()  # level 0 is the dense weight as given, dead columns included
    weights = {c: snaps[c].to(device=weight.device, dtype=weight.dtype).clone() for c in sorted(counts)}
    return ObsLevels(order=torch.tensor(order, dtype=torch.long), weights=weights)


def _group_width(kind: str, geo: Geometry) -> int:
    return geo.attn_width if kind == "attn" else 1


def obs_levels(
    model: nn.Module,
    calibration: torch.Tensor,
    levels: Mapping[str, Sequence[int]],
    *,
    rel_damp: float = 1e-2,
    batch_size: int = 8,
    attention_unit: str = "kv_group",
) -> list[dict[str, ObsLevels]]:
    """Per layer, the nested OBS removal order and updated o_proj / down_proj weights at each removal count.

    Args:
        model: a Llama-family causal LM; its weights are read, never written.
        calibration: token ids (N, T); H is gathered from the dense model for every layer.
        levels: kind ("attn" / "mlp") -> removal counts (attention units / channels), e.g. {"attn": [0, 1, 2]}.
        rel_damp: dampening added to diag H, relative to its mean.
        batch_size: sequences per forward pass.
        attention_unit: "kv_group" or "q_head" (query heads removed, K/V kept: DarwinLM's `kv_ignore`).
    """
    kinds = tuple(levels)
    check_kinds(kinds)
    geo = Geometry.of(model, attention_unit)
    stats = input_stats(model, calibration, kinds, batch_size, gram=True)
    out = []
    for layer, st in zip(decoder_layers(model), stats, strict=True):
        out.append(
            {
                kind: obs_prune(
                    target_linear(layer, kind).weight,
                    st[kind].xtx,
                    _group_width(kind, geo),
                    levels[kind],
                    rel_damp,
                )
                for kind in kinds
            }
        )
    return out


class Obs:
    """ZipLM / OBS criterion: units scored by greedy removal order (first removed = 0, higher = keep)."""

    name = "obs"

    def __init__(self, rel_damp: float = 1e-2, batch_size: int = 8, attention_unit: str = "kv_group"):
        self.rel_damp = rel_damp
        self.batch_size = batch_size
        self.attention_unit = attention_unit

    def score(
        self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS
    ) -> UnitScores:
        """Remove every unit greedily with OBS updates; a unit's score is the step at which it went."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        n_units = {"attn": geo.attn_units, "mlp": geo.inter}
        per_layer = obs_levels(
            model,
            calibration,
            {k: [n_units[k]] for k in kinds},
            rel_damp=self.rel_damp,
            batch_size=self.batch_size,
            attention_unit=self.attention_unit,
        )
        layers = []
        for res in per_layer:
            out = {k: empty() for k in KINDS}
            for kind, lv in res.items():
                scores = torch.empty(n_units[kind], dtype=torch.float64)
                scores[lv.order] = torch.arange(n_units[kind], dtype=torch.float64)
                out[kind] = scores
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)
