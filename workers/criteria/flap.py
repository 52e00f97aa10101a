"""FLAP: fluctuation of o_proj / down_proj input columns, with bias compensation of the removed ones.

Column score s_j = Var_t(X_j)·‖W[:, j]‖₂² (population variance over every calibration token); an attention unit's
score is the sum over its columns (FLAP takes the mean and squares the attention metric; both are rank-neutral within a
layer). A column that barely fluctuates can be replaced by its mean: adding the bias b = W[:, P]·mean(X_P) for
the removed set P keeps the output mean, and removes a constant column with no error at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from workers.criteria._common import (
    KINDS,
    Geometry,
    check_kinds,
    decoder_layers,
    empty,
    input_stats,
    layerwise_stats,
    target_linear,
    unit_columns,
    unit_reduce,
)
from workers.criteria.base import LayerScores, LinearLevels, UnitScores
from workers.levels import removal_order

# the catalog entry (darwinfront.core.criteria)
CRITERIA = {"flap": {"class": "Flap", "supports": ["bias_compensation"]}}


def fluctuation_columns(weight: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Column scores Var(X_j)·‖W[:, j]‖² of a linear with weight (out, in) and input variances (in,)."""
    w = weight.detach().to(device=var.device, dtype=torch.float64)
    return (w * w).sum(0) * var


def flap_bias(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The bias (out,) that replaces the `removed` input columns (bool mask (in,)) by their calibration mean."""
    w = weight.detach().to(device=mean.device, dtype=torch.float64)
    removed = removed.to(mean.device)
    return w[:, removed] @ mean[removed]


class Flap:
    """FLAP fluctuation criterion (WIFV).

    With `bias_compensation` its levels carry tensors (`stores_weights`): each level's output shift
    W[:, P]·mean(X_P) for the columns P it removes, which the level database stores and candidates add.
    """

    name = "flap"

    def __init__(self, batch_size: int = 8, attention_unit: str = "kv_group", bias_compensation: bool = False):
        self.batch_size = batch_size
        self.attention_unit = attention_unit
        self.bias_compensation = bias_compensation

    @property
    def stores_weights(self) -> bool:
        return self.bias_compensation

    def score(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> UnitScores:
        """Fluctuation scores of every attention unit / MLP channel, from one pass over `calibration`."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        stats = input_stats(model, calibration, kinds, self.batch_size)
        layers = []
        for layer, st in zip(decoder_layers(model), stats, strict=True):
            out = {k: empty() for k in KINDS}
            for kind in kinds:
                out[kind] = unit_reduce(fluctuation_columns(target_linear(layer, kind).weight, st[kind].var), kind, geo)
            layers.append(LayerScores(**{k: v.cpu() for k, v in out.items()}))
        return UnitScores(layers=tuple(layers), criterion=self.name)

    def level_weights(
        self,
        model: nn.Module,
        calibration: torch.Tensor,
        counts: Mapping[str, Sequence[int]],
        *,
        layers: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, dict[str, LinearLevels]]]:
        """Per layer (walked one at a time, `layerwise_stats`), the fluctuation removal order and, at each removal
        count, the compensating output shift of the removed units (in the linear's dtype)."""
        kinds = tuple(counts)
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        stack = decoder_layers(model)
        for i, stats in layerwise_stats(model, calibration, kinds, self.batch_size, layers=layers):
            result = {}
            for kind in kinds:
                weight = target_linear(stack[i], kind).weight
                scores = unit_reduce(fluctuation_columns(weight, stats[kind].var), kind, geo)
                order = removal_order(scores.tolist())
                shifts = {
                    c: flap_bias(weight, stats[kind].mean, unit_columns(torch.tensor(order[:c]), kind, geo)).to(weight)
                    for c in counts[kind] if c
                }
                result[kind] = LinearLevels(torch.tensor(order), shifts=shifts)
            yield i, result
