"""The model families darwinfront prunes: one adapter module per family, one registry line each.

`family_of(model)` finds a model's adapter (a pruned model's class subclasses its family's, so it is found too)
and puts the model's layers in the layout the adapter names (`Family.canonical`: Phi-3's fused projections are
split there, in place, once);
`shape(model)` is the one reader of a model's dense unit geometry. Adding a family: a module here with its
`FAMILY`, its line below, its name in `darwinfront.architectures`, and its exported modeling file in
`workers.pruned_hf`.
"""

from __future__ import annotations

from torch import nn

from darwinfront.architectures import SUPPORTED_ARCHITECTURES, unsupported
from darwinfront.core.errors import InvalidSpec

from . import gemma2, gemma3, gpt_neox, llama, mistral, mixtral, olmo2, olmoe, phi3, qwen2, qwen3, qwen3_moe
from .base import Family, Shape, head_dim

FAMILIES: dict[str, Family] = {m.FAMILY.architecture: m.FAMILY for m in (llama, mistral, qwen2, qwen3, gemma2,
                                                                          gemma3, phi3, olmo2, mixtral,
                                                                          qwen3_moe, olmoe, gpt_neox)}
assert tuple(FAMILIES) == SUPPORTED_ARCHITECTURES, (tuple(FAMILIES), SUPPORTED_ARCHITECTURES)

__all__ = ["FAMILIES", "Family", "Shape", "family_of", "find_family", "head_dim", "shape"]


def find_family(model: nn.Module) -> Family | None:
    """The adapter of `model`'s family (the first registered class it is or subclasses), or None."""
    return next((FAMILIES[c.__name__] for c in type(model).__mro__ if c.__name__ in FAMILIES), None)


def family_of(model: nn.Module) -> Family:
    """The adapter of `model`'s family, with `model` in its layout (`Family.canonical`); `InvalidSpec` naming the
    architecture and the supported ones otherwise."""
    family = find_family(model)
    if family is None:
        raise InvalidSpec("model.source", unsupported(type(model).__name__))
    family.canonical(model)
    return family


def shape(model: nn.Module) -> Shape:
    """The dense shape of `model` (its family's reading of its config and layers)."""
    return family_of(model).shape(model)
