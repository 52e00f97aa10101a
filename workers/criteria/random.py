"""Random: seeded uniform scores, the control every data-aware criterion must beat."""

from __future__ import annotations

import torch
from torch import nn

from workers.criteria._common import KINDS, Geometry, check_kinds, empty
from workers.criteria.base import LayerScores, UnitScores

CRITERIA = {"random": {"class": "Random"}}  # the catalog entry (darwinfront.core.criteria)


class Random:
    """Uniform(0, 1) scores drawn from a generator seeded with `seed`; model weights and data are ignored."""

    name = "random"

    def __init__(self, seed: int = 0, attention_unit: str = "kv_group"):
        self.seed = seed
        self.attention_unit = attention_unit

    def score(
        self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS
    ) -> UnitScores:
        """Draw one score per attention unit and MLP channel; the same seed and shape give the same scores."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        gen = torch.Generator().manual_seed(self.seed)
        layers = []
        for _ in range(geo.n_layers):
            # Always draw both kinds so a layer's attn scores do not depend on whether mlp was asked for.
            attn = torch.rand(geo.attn_units, generator=gen, dtype=torch.float64)
            mlp = torch.rand(geo.mlp_units, generator=gen, dtype=torch.float64)
            drawn = {"attn": attn, "mlp": mlp}
            layers.append(LayerScores(**{k: drawn[k] if k in kinds else empty() for k in KINDS}))
        return UnitScores(layers=tuple(layers), criterion=self.name)
