"""The one small interface every pruning criterion speaks: scores per layer and per unit, higher = keep."""

from __future__ import annotations

from dataclasses import dataclass
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


class Criterion(Protocol):
    """A saliency criterion: `score(model, calibration, kinds)` -> per-layer, per-unit scores."""

    name: str

    def score(
        self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = ("attn", "mlp")
    ) -> UnitScores:
        """Score every unit of `kinds` in every decoder layer from `calibration` token ids (N, T)."""
        ...
