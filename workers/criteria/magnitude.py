"""Magnitude: Σ|W| over a unit's o_proj / down_proj input columns. Data-blind; a control, not a contender."""

from __future__ import annotations

import torch
from torch import nn

from workers.criteria._common import (
    KINDS,
    Geometry,
    check_kinds,
    decoder_layers,
    empty,
    target_linear,
    unit_reduce,
)
from workers.criteria.base import LayerScores, UnitScores

CRITERIA = {"magnitude": {"class": "Magnitude"}}  # the catalog entry (darwinfront.core.criteria)


class Magnitude:
    """Weight-magnitude criterion; `calibration` is accepted for the interface and ignored."""

    name = "magnitude"

    def __init__(self, attention_unit: str = "kv_group"):
        self.attention_unit = attention_unit

    def score(
        self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS
    ) -> UnitScores:
        """Score every attention unit / MLP channel by the L1 norm of its o_proj / down_proj columns."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        layers = []
        for layer in decoder_layers(model):
            out = {k: empty() for k in KINDS}
            for kind in kinds:
                col = target_linear(layer, kind).weight.detach().to(torch.float64).abs().sum(0).cpu()
                out[kind] = unit_reduce(col, kind, geo)
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)
