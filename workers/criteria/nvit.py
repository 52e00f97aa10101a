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


class NViT:
    """NViT's Hessian-aware (Fisher) group saliency, mean over micro-batches of (Σ_S w·g)²; higher = keep."""

    name = "nvit"

    def __init__(self, batch_size: int = 8, attention_unit: str = "kv_group"):
        self.batch_size = batch_size
        self.attention_unit = attention_unit

    def score(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> UnitScores:
        """One forward and backward per micro-batch; scores every attention unit / MLP channel of `kinds`."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        products = [group_products(model, ids, kinds, geo) for ids in micro_batches(calibration, self.batch_size)]
        layers = []
        for i in range(geo.n_layers):
            out = {k: empty() for k in KINDS}
            out.update({k: torch.stack([batch[i][k] for batch in products]).pow(2).mean(0) for k in kinds})
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)
