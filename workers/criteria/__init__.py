"""Saliency criteria for structured pruning: one module per criterion, each speaking
`score(model, calibration)`. A module registers itself by declaring its catalog entries (`CRITERIA`, read by
`darwinfront.core.criteria` without importing it); `get(name, **kwargs)` builds a criterion by name (keyword
arguments go to its constructor) and `names()` lists them.
Scores are per decoder layer, per unit (KV group or query head / MLP channel); higher = keep.
"""

from __future__ import annotations

import importlib

from darwinfront.core import criteria as catalog
from workers.criteria.base import Criterion, LayerScores, LevelCriterion, LinearLevels, UnitScores


def names() -> list[str]:
    """Registered criterion names, sorted."""
    return list(catalog.names())


def get(name: str, **kwargs) -> Criterion:
    """Build the criterion registered as `name`; `kwargs` go to its constructor (`seed`, `batch_size`...)."""
    entry = catalog.entry(name)
    return getattr(importlib.import_module(entry.module), entry.cls)(**{**entry.defaults, **kwargs})


def stores_weights(criterion: Criterion) -> bool:
    """Whether `criterion`'s levels carry tensors (it is a `LevelCriterion` that stores them)."""
    return bool(getattr(criterion, "stores_weights", False))


__all__ = ["Criterion", "LayerScores", "LevelCriterion", "LinearLevels", "UnitScores", "get", "names",
           "stores_weights"]
