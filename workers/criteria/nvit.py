"""NViT group saliency: (Σ_{i∈S} w_i·g_i)² per micro-batch, averaged over the micro-batches (Yang et al., CVPR'23).

S is every weight a unit couples (as for Taylor: a KV group's q/k/v rows and o_proj columns, a query head's q
rows and o_proj columns, an MLP channel's gate/up rows and down_proj column) and g = ∂T_b/∂w with T_b the mean
next-token cross-entropy of micro-batch b. Σ_S w·g is the derivative of T_b when the unit's weights are scaled
together by 1 + s (at s = 0), so its square is the Fisher estimate of the second-order loss change of removing
the unit, ½ E[(gᵀw_S)²], in loss units (saliency.md §2.7). Unlike Taylor's Σ|w·g| the signs inside a unit cancel
before squaring, and unlike `gate_fisher` the whole coupled group is scaled, not only the o_proj / down_proj input.
NViT also divides the inner sums of shared structures before squaring; a decoder layer's units share nothing,
so none is divided here. One forward and backward per micro-batch; the micro-batch size is part of the
statistic (smaller batches weigh noise more).
"""

from __future__ import annotations

import torch
from torch import nn

from workers.criteria._common import KINDS, Geometry, check_kinds, decoder_layers, empty, micro_batches
from workers.criteria.base import LayerScores, UnitScores
from workers.criteria.taylor import coupled, unit_sum, weight_gradients

CRITERIA = {"nvit": {"class": "NViT"}}  # the catalog entry (darwinfront.core.criteria)


def group_products(
    model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...], geo: Geometry
) -> list[dict[str, torch.Tensor]]:
    """Σ_S w·∂T/∂w per unit (fp64, CPU), per layer and kind, with T the mean CE over all of `calibration`."""
    grads = weight_gradients(model, calibration, kinds, batch_size=calibration.shape[0])
    out = []
    for layer, per_kind in zip(decoder_layers(model), grads, strict=True):
        products = {}
        for kind, g in per_kind.items():
            mats = coupled(layer, kind)
            signed = {name: mats[name].weight.detach().to(torch.float64) * g[name] for name in mats}
            products[kind] = unit_sum(signed, kind, geo).cpu()
        out.append(products)
    return out


BLOCKS = ("attn", "mlp", "layer")  # a layer's attention sub-layer, its MLP sub-layer, the whole decoder layer


def saliencies(
    model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS, *, batch_size: int = 8,
    attention_unit: str = "kv_group",
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """NViT's saliency of every unit and every block, on one scale: mean over micro-batches of (Σ_S w·g)².

    A block's Σ_S w·g is the sum of its units' (every weight of an attention or MLP sub-layer belongs to exactly one
    of its units; a layer's is its two sub-layers'), so units and blocks come from the same backward passes.
    Returns (per layer, kind -> (n_units,)) and (per layer, block -> saliency), blocks of `kinds` only ("layer"
    when both kinds are scored).
    """
    check_kinds(kinds)
    geo = Geometry.of(model, attention_unit)
    products = [group_products(model, ids, kinds, geo) for ids in micro_batches(calibration, batch_size)]
    units, blocks = [], []
    for i in range(geo.n_layers):
        per_batch = [batch[i] for batch in products]
        units.append({k: torch.stack([b[k] for b in per_batch]).pow(2).mean(0) for k in kinds})
        sums = {k: torch.stack([b[k].sum() for b in per_batch]) for k in kinds}  # (batches,)
        if len(kinds) == len(KINDS):
            sums["layer"] = sum(sums[k] for k in KINDS)
        blocks.append({b: v.pow(2).mean().item() for b, v in sums.items()})
    return units, blocks


class NViT:
    """NViT's Hessian-aware (Fisher) group saliency, mean over micro-batches of (Σ_S w·g)²; higher = keep.

    `saliencies` also scores whole blocks on the same scale; `workers.nvit_global` ranks units and blocks of every
    layer in one list against their measured latency.
    """

    name = "nvit"

    def __init__(self, batch_size: int = 8, attention_unit: str = "kv_group"):
        self.batch_size = batch_size
        self.attention_unit = attention_unit

    def score(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> UnitScores:
        """One forward and backward per micro-batch; scores every attention unit / MLP channel of `kinds`."""
        units, _ = saliencies(model, calibration, kinds, batch_size=self.batch_size,
                              attention_unit=self.attention_unit)
        layers = []
        for per_kind in units:
            out = {k: empty() for k in KINDS}
            out.update(per_kind)
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)
