"""A candidate as a small model of its own: the dense model's decoder cut to a genome's levels, the rest shared.

`build` returns a model object that shares the dense model's embeddings, norms, rotary embedding and lm_head
by reference and holds new, physically sliced attention and MLP linears (`slicing.slice_model` cuts them): the
q/k/v/gate/up rows of the kept units come from the dense model, the kept o_proj / down_proj columns from the
level database's stored weights (obs) or from the dense weights (other criteria), and a level that carries an
output shift (FLAP's bias compensation) adds it to the cut linear's output. Building copies the kept decoder
weights once and never writes the dense model. Training a candidate writes the shared parameters
in place, so whoever trains one puts them back afterwards (`shared_parameters` says which).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from search.genome import PruneGenome
from workers import implants, levels, slicing
from workers.database import LevelDatabase
from workers.levels import KINDS


class LevelWeights:
    """The stored level tensors of a database whose levels carry them (o_proj / down_proj weights, output shifts),
    read from disk on demand and kept in an LRU cache.

    Args:
        database: the level database (one that stores weights).
        like: a dense weight; loaded tensors take its device and dtype.
        cache_bytes: the most bytes of loaded level tensors to keep.
    """

    def __init__(self, database: LevelDatabase, like: torch.Tensor, *, cache_bytes: int = 256 << 20):
        self.database, self.like, self.cache_bytes = database, like, cache_bytes
        self._cache: OrderedDict[tuple[int, str, int], dict[str, torch.Tensor]] = OrderedDict()

    def __call__(self, layer: int, kind: str, level: int) -> dict[str, torch.Tensor]:
        """What `kind`'s target linear in `layer` carries at `level` >= 1: `weight` (out, in), removed columns
        zero, and / or `shift` (out,)."""
        key = (layer, kind, level)
        if key not in self._cache:
            stored = self.database.load_level(layer, kind, level)
            self._cache[key] = {name: t.to(self.like.device, self.like.dtype) for name, t in stored.items()}
            while len(self._cache) > 1 and self._bytes() > self.cache_bytes:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def implant(self, layer: int, kind: str, level: int) -> dict[str, torch.Tensor]:
        """The fitted neural implant of `kind` in `layer` at `level` (`in`, `out`), cached like the levels."""
        key = (layer, f"{kind}:implant", level)
        if key not in self._cache:
            stored = self.database.load_implant(layer, kind, level)
            self._cache[key] = {name: t.to(self.like.device, self.like.dtype) for name, t in stored.items()}
            while len(self._cache) > 1 and self._bytes() > self.cache_bytes:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _bytes(self) -> int:
        return sum(t.nbytes for tensors in self._cache.values() for t in tensors.values())


def build(
    model: nn.Module,
    database: LevelDatabase,
    genome: PruneGenome,
    *,
    weights: LevelWeights | None = None,
    trainable: bool = False,
) -> nn.Module:
    """The sliced candidate of `genome`, sharing with the dense `model` everything outside the decoder's linears.

    Args:
        model: the dense model (read, never written).
        database: its level database; its removal orders say which units go.
        genome: the candidate's levels.
        weights: the stored level tensors of a database that stores them or has neural implants; None cuts
            the dense weights and leaves implants zero, which gives the structure alone (what
            `slicing.apply_configuration` gives on the dense model).
        trainable: also give the candidate its own copy of the linears its genome keeps whole (levels 0), so
            that training it writes no dense decoder weight; without it those linears are shared.

    Returns:
        A model with `config.darwinfront_layout` set, as `slicing.slice_model` leaves one (`save_pruned` takes it).
    """
    candidate = _shell(model)
    implanted = set(genome.implants)
    carried = {(i, kind): weights(i, kind, level) for i in range(len(genome.attn))
               for kind, level in zip(KINDS, (genome.attn[i], genome.mlp[i]), strict=True)
               if level and weights is not None and database.stores_weights and (i, kind) not in implanted}
    for (i, kind), tensors in carried.items():
        if "weight" in tensors:
            _hold_level_weight(candidate.model.layers[i], kind, tensors["weight"])
    slicing.slice_model(candidate, levels.layout(genome, database.orders, database.table))
    for (i, kind), tensors in carried.items():
        if "shift" in tensors:
            slicing.add_output_shift(candidate.model.layers[i], kind, tensors["shift"])
    for i, kind in implanted if weights is not None else ():  # without weights an implant stays zero (structure)
        level = genome.attn[i] if kind == "attn" else genome.mlp[i]
        implants.load_into(implants.block_of(candidate.model.layers[i], kind), weights.implant(i, kind, level))
    if trainable:
        _own_whole_linears(candidate, model)
    return candidate


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The dense model's parameters that every candidate shares: all but those of its attention and MLP blocks."""
    own = {id(p) for layer in model.model.layers for block in (layer.self_attn, layer.mlp) for p in block.parameters()}
    return [p for p in model.parameters() if id(p) not in own]


def _shell(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree down to each layer's attention and MLP, sharing every tensor.

    Replacing a submodule of the shell (as slicing does) leaves the dense model untouched; the config is copied
    because slicing records the layout in it.
    """
    candidate = _shallow(model)
    candidate.config = copy.deepcopy(model.config)
    candidate.model = _shallow(model.model)
    layers = []
    for layer in model.model.layers:
        shell = _shallow(layer)
        shell.self_attn, shell.mlp = _shallow(layer.self_attn), _shallow(layer.mlp)
        layers.append(shell)
    candidate.model.layers = nn.ModuleList(layers)
    return candidate


def _shallow(module: nn.Module) -> nn.Module:
    """The same module again with its own tables (children, parameters, buffers, hooks); the tensors shared."""
    new = copy.copy(module)
    new.__dict__.update({k: copy.copy(v) for k, v in vars(module).items() if isinstance(v, dict | set)})
    return new


def _hold_level_weight(layer: nn.Module, kind: str, weight: torch.Tensor) -> None:
    """Put a level's stored (out, in) weight in the shell's o_proj / down_proj, for slicing to cut its columns."""
    parent, name = (layer.self_attn, "o_proj") if kind == "attn" else (layer.mlp, "down_proj")
    dense = getattr(parent, name)
    linear = nn.Linear(dense.in_features, dense.out_features, bias=dense.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=dense.weight.requires_grad)
    linear.bias = dense.bias
    setattr(parent, name, linear)


def _own_whole_linears(candidate: nn.Module, model: nn.Module) -> None:
    """Replace every decoder linear the candidate still shares with the dense model by a copy of it."""
    dense = {id(p) for layer in model.model.layers for p in layer.parameters()}
    for layer in candidate.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, child in block.named_children():
                if isinstance(child, nn.Linear) and id(child.weight) in dense:
                    setattr(block, name, slicing.copy_linear(child))
