"""First-order Taylor (LLM-Pruner "Element¹"): Σ |w·g| over every weight a unit couples, g = ∂T/∂w.

T is the mean next-token cross-entropy over the calibration set. A KV group couples its r·h q_proj rows, its h
k_proj and v_proj rows and its r·h o_proj columns; a query head (K/V kept) its h q_proj rows and o_proj
columns; an MLP channel couples its gate_proj and up_proj rows and its down_proj column, and an expert of a
mixture-of-experts layer its channels and its router row. Gradients are
accumulated over micro-batches before |w·g| is taken, so chunking does not matter.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.criteria import _gates
from workers.criteria._common import (
    KINDS,
    Geometry,
    check_kinds,
    decoder_layers,
    empty,
    group_reduce,
    micro_batches,
    unit_reduce,
)
from workers.criteria.base import LayerScores, UnitScores

CRITERIA = {"taylor": {"class": "Taylor"}}  # the catalog entry (darwinfront.core.criteria)


def coupled(layer: nn.Module, kind: str) -> dict[str, nn.Linear]:
    if kind == "attn":
        a = layer.self_attn
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj}
    m = layer.mlp
    router = {"router": m.router} if hasattr(m, "router") else {}  # a mixture of experts' (one row per expert)
    gate = {"gate": m.gate_proj} if hasattr(m, "gate_proj") else {}  # (a non-gated MLP has none: GPT-NeoX)
    return {**gate, "up": m.up_proj, "down": m.down_proj, **router}


def unit_sum(saliency: dict[str, torch.Tensor], kind: str, geo: Geometry) -> torch.Tensor:
    """Aggregate per-weight saliency |w·g| of one layer's coupled matrices into per-unit scores."""
    if kind == "mlp":
        rows = saliency["up"].sum(1) + (saliency["gate"].sum(1) if "gate" in saliency else 0)
        channels = unit_reduce(rows + saliency["down"].sum(0), kind, geo)
        return channels + saliency["router"].sum(1) if "router" in saliency else channels
    q = group_reduce(saliency["q"].sum(1), geo)  # q rows are head-major, like o columns
    o = group_reduce(saliency["o"].sum(0), geo)
    if geo.unit == "q_head":  # K/V heads stay: they are not part of the unit
        return q + o
    kv = (saliency["k"].sum(1) + saliency["v"].sum(1)).reshape(geo.n_kv, geo.head_dim).sum(1)
    return q + kv + o


def weight_gradients(
    model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS, batch_size: int = 8
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """∂T/∂W (fp64) of every coupled matrix, per layer and kind; T = mean CE. Leaves the model's grads as found."""
    check_kinds(kinds)
    layers = decoder_layers(model)
    wanted = [lin.weight for layer in layers for kind in kinds for lin in coupled(layer, kind).values()]
    saved = [(w, w.grad) for w in wanted]
    with _gates.frozen(model), torch.enable_grad():
        for w in wanted:
            w.requires_grad_(True)
            w.grad = None
        scale = 1.0 / _gates.predictions(calibration)
        for ids in micro_batches(calibration, batch_size):
            (_gates.sample_ce(model, ids).sum() * scale).backward()
        grads = [
            {
                kind: {name: lin.weight.grad.detach().to(torch.float64) for name, lin in coupled(layer, kind).items()}
                for kind in kinds
            }
            for layer in layers
        ]
    for w, g in saved:
        w.grad = g
    return grads


class Taylor:
    """First-order Taylor criterion |w·∂T/∂w| summed over each unit's coupled weights."""

    name = "taylor"

    def __init__(self, batch_size: int = 8, attention_unit: str = "kv_group"):
        self.batch_size = batch_size
        self.attention_unit = attention_unit

    def score(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> UnitScores:
        """One forward and backward per micro-batch; scores every attention unit / MLP channel of `kinds`."""
        geo = Geometry.of(model, self.attention_unit)
        grads = weight_gradients(model, calibration, kinds, self.batch_size)
        layers = []
        for layer, per_kind in zip(decoder_layers(model), grads, strict=True):
            out = {k: empty() for k in KINDS}
            for kind, g in per_kind.items():
                mats = coupled(layer, kind)
                sal = {name: (mats[name].weight.detach().to(torch.float64) * g[name]).abs() for name in mats}
                out[kind] = unit_sum(sal, kind, geo).cpu()
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)
