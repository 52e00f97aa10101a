"""Wanda-sp (structured Wanda, from the FLAP repository): |W|·‖X‖ on o_proj / down_proj input columns.

Column score s_j = Σ_i |W_ij|·‖X_j‖₂ with ‖X_j‖₂ taken over every calibration token; an attention unit's
score is the sum over its columns (all its query heads' for a KV group). One forward pass, O(width) statistics
per linear.
"""

from __future__ import annotations

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
    unit_reduce,
)
from workers.criteria.base import LayerScores, UnitScores

CRITERIA = {"wanda_sp": {"class": "WandaSP"}}  # the catalog entry (darwinfront.core.criteria)


def wanda_columns(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Column scores Σ_i |W_ij|·‖X_j‖ of a linear with weight (out, in) and input column norms (in,)."""
    return weight.detach().to(device=norm.device, dtype=torch.float64).abs().sum(0) * norm


class WandaSP:
    """Wanda-sp criterion: activation-weighted magnitude of the o_proj / down_proj input columns."""

    name = "wanda_sp"

    def __init__(self, batch_size: int = 8, attention_unit: str = "kv_group"):
        self.batch_size = batch_size
        self.attention_unit = attention_unit

    def score(
        self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS
    ) -> UnitScores:
        """Score every attention unit / MLP channel from one pass over `calibration` (N, T) token ids."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        stats = input_stats(model, calibration, kinds, self.batch_size)
        layers = []
        for layer, st in zip(decoder_layers(model), stats, strict=True):
            out = {k: empty() for k in KINDS}
            for kind in kinds:
                col = wanda_columns(target_linear(layer, kind).weight, st[kind].norm)
                out[kind] = unit_reduce(col, kind, geo).cpu()
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)
