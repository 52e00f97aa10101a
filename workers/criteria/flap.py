"""FLAP: fluctuation of o_proj / down_proj input columns, with bias compensation of the removed ones.

Column score s_j = Var_t(X_j)·‖W[:, j]‖₂² (population variance over every calibration token); an attention unit's
score is the sum over its columns (FLAP takes the mean and squares the attention metric; both are rank-neutral within a
layer). A column that barely fluctuates can be replaced by its mean: adding the bias b = W[:, P]·mean(X_P) for
the removed set P keeps the output mean, and removes a constant column with no error at all.
"""

from __future__ import annotations

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
    unit_columns,
    unit_reduce,
)
from workers.criteria.base import LayerScores, UnitScores

CRITERIA = {"flap": {"class": "Flap"}}  # the catalog entry (darwinfront.core.criteria)


def fluctuation_columns(weight: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Column scores Var(X_j)·‖W[:, j]‖² of a linear with weight (out, in) and input variances (in,)."""
    w = weight.detach().to(device=var.device, dtype=torch.float64)
    return (w * w).sum(0) * var


def flap_bias(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The bias (out,) that replaces the `removed` input columns (bool mask (in,)) by their calibration mean."""
    w = weight.detach().to(device=mean.device, dtype=torch.float64)
    removed = removed.to(mean.device)
    return w[:, removed] @ mean[removed]


@dataclass(frozen=True)
class FlapFit:
    """FLAP scores and the per-layer input means that the bias compensation needs.

    Attributes:
        scores: the unit scores (higher = keep).
        means: per layer, kind -> mean of the target linear's input columns (fp64).
    """

    scores: UnitScores
    means: tuple[dict[str, torch.Tensor], ...]
    attention_unit: str = "kv_group"

    def bias(self, model: nn.Module, layer: int, kind: str, removed_units: torch.Tensor) -> torch.Tensor:
        """Bias to add to layer `layer`'s o_proj / down_proj when `removed_units` (indices) are cut."""
        lin = target_linear(decoder_layers(model)[layer], kind)
        removed = unit_columns(removed_units, kind, Geometry.of(model, self.attention_unit))
        return flap_bias(lin.weight, self.means[layer][kind], removed)


class Flap:
    """FLAP fluctuation criterion (WIFV); `fit` also returns the means for bias compensation."""

    name = "flap"

    def __init__(self, batch_size: int = 8, attention_unit: str = "kv_group"):
        self.batch_size = batch_size
        self.attention_unit = attention_unit

    def fit(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> FlapFit:
        """One pass over `calibration`: fluctuation scores of every unit and the input means."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        stats = input_stats(model, calibration, kinds, self.batch_size)
        layers, means = [], []
        for layer, st in zip(decoder_layers(model), stats, strict=True):
            out = {k: empty() for k in KINDS}
            for kind in kinds:
                col = fluctuation_columns(target_linear(layer, kind).weight, st[kind].var)
                out[kind] = unit_reduce(col, kind, geo).cpu()
            layers.append(LayerScores(**out))
            means.append({kind: st[kind].mean for kind in kinds})
        return FlapFit(UnitScores(layers=tuple(layers), criterion=self.name), tuple(means), self.attention_unit)

    def score(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> UnitScores:
        """Fluctuation scores of every attention unit / MLP channel."""
        return self.fit(model, calibration, kinds).scores
