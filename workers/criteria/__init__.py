"""Saliency criteria for structured pruning: one module per criterion, each speaking
`score(model, calibration)`. `get(name, **kwargs)` builds a criterion by name (keyword arguments go to its
constructor); `names()` lists them.
Scores are per decoder layer, per unit (KV group or query head / MLP channel); higher = keep.
"""

from __future__ import annotations

import importlib

from workers.criteria.base import Criterion, LayerScores, UnitScores

# name -> (module, class, default constructor arguments); modules are imported on first use.
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "random": ("workers.criteria.random", "Random", {}),
    "magnitude": ("workers.criteria.magnitude", "Magnitude", {}),
    "wanda_sp": ("workers.criteria.wanda_sp", "WandaSP", {}),
    "obs": ("workers.criteria.obs", "Obs", {}),
    "flap": ("workers.criteria.flap", "Flap", {}),
    "taylor": ("workers.criteria.taylor", "Taylor", {}),
    "gate": ("workers.criteria.gate", "Gate", {}),
    "gate_fisher": ("workers.criteria.gate", "Gate", {"stat": "fisher"}),
    "gate_spsa": ("workers.criteria.gate", "Gate", {"estimator": "spsa"}),
    "ablation": ("workers.criteria.ablation", "Ablation", {}),
}


def names() -> list[str]:
    """Registered criterion names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Criterion:
    """Build the criterion registered as `name`; `kwargs` go to its constructor (`seed`, `batch_size`...)."""
    try:
        module, cls, defaults = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown criterion {name!r}; known: {', '.join(names())}") from None
    return getattr(importlib.import_module(module), cls)(**{**defaults, **kwargs})


__all__ = ["Criterion", "LayerScores", "UnitScores", "get", "names"]
