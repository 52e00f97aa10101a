"""The one small interface every pruning criterion speaks: scores per layer and per unit, higher = keep."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class LayerScores:
    """Scores of one decoder layer's units: `attn` per attention unit (KV group or query head), `mlp` per channel."""

    attn: torch.Tensor
    mlp: torch.Tensor


@dataclass(frozen=True)
class UnitScores:
    """Per-layer unit scores of a whole model; the lowest-scored units are removed first."""

    layers: tuple[LayerScores, ...]
    criterion: str

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "layers": [{"attn": s.attn.tolist(), "mlp": s.mlp.tolist()} for s in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict) -> UnitScores:
        layers = tuple(
            LayerScores(
                attn=torch.tensor(s["attn"], dtype=torch.float64), mlp=torch.tensor(s["mlp"], dtype=torch.float64)
            )
            for s in data["layers"]
        )
        return cls(layers=layers, criterion=data["criterion"])


@dataclass(frozen=True)
class LinearLevels:
    """One o_proj / down_proj's levels as a criterion whose levels carry tensors computes them.

    Attributes:
        order: unit indices in removal order (at least the first `max(counts)` removed units).
        weights: removal count -> full-size weight (out, in) that level uses, the removed units' columns zero
            (OBS's updated weights); counts without one keep the dense weight.
        shifts: removal count -> a constant (out,) that level adds to the linear's output (FLAP's bias
            compensation); counts without one add nothing.
    """

    order: torch.Tensor
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    shifts: dict[int, torch.Tensor] = field(default_factory=dict)

    def cpu(self) -> LinearLevels:
        """The same levels with every tensor on the CPU (to cross a process boundary)."""
        return LinearLevels(self.order.cpu(), {c: w.cpu() for c, w in self.weights.items()},
                            {c: s.cpu() for c, s in self.shifts.items()})


class Criterion(Protocol):
    """A saliency criterion: `score(model, calibration, kinds)` -> per-layer, per-unit scores.

    A criterion whose levels carry tensors (updated weights, output shifts) says so with `stores_weights = True`
    and also speaks `level_weights`; the level database then stores what it yields, layer by layer.
    """

    name: str

    def score(
        self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = ("attn", "mlp")
    ) -> UnitScores:
        """Score every unit of `kinds` in every decoder layer from `calibration` token ids (N, T)."""
        ...


class LevelCriterion(Criterion, Protocol):
    """A criterion whose levels carry tensors: the level database writes what `level_weights` yields."""

    stores_weights: bool

    def level_weights(
        self,
        model: nn.Module,
        calibration: torch.Tensor,
        counts: Mapping[str, Sequence[int]],
        *,
        layers: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, dict[str, LinearLevels]]]:
        """Per decoder layer of `layers` (default all, any order), (layer, kind -> `LinearLevels`) at the
        removal `counts` of each kind, yielded as each layer finishes so that a caller holds one layer's
        tensors at a time; the dense model's weights are read, never written."""
        ...
