"""HAP relative Hessian trace: Ω_S = Tr(H_SS)/n_S · ‖W_S‖², Hutchinson-estimated (Yu et al., WACV'22).

S is every weight a unit couples (as for Taylor: a KV group's q/k/v rows and o_proj columns, a query head's q rows
and o_proj columns, an MLP channel's gate/up rows and down_proj column), n_S its parameter count and H the Hessian
of T, the mean next-token cross-entropy over the calibration set. Ω_S is the second-order loss change of zeroing
S when H_SS ≈ (Tr(H_SS)/n_S)·I (HAP's "relative Hessian trace", in loss units, without its constant ½).

Hutchinson: for a Rademacher vector v over every coupled weight of the model, E[v_Sᵀ(Hv)_S] = Tr(H_SS), so one
Hessian-vector product (a double backward) per probe estimates every unit's trace at once; a probe's v is the same
for every micro-batch, so the estimate does not depend on chunking. The probes' spread gives each trace a standard
error (`hutchinson`). A unit whose coupled weights are all zero scores exactly 0 (‖W_S‖² = 0); one silenced through
a single matrix (say its down_proj column) keeps the curvature along its other weights.

Differences from HAP's recipe: HAP prunes CNN output channels and transformer heads of BERT-style models with one
global threshold (the trace is in loss units) and retrains; here the units are Llama's KV groups / query heads and
gated-MLP channels, the level database ranks them within each layer, and nothing is retrained. HAP draws 3 probes
over a 512-sample batch; the default here is 8 probes over the database's calibration tokens (`probes`).
Memory: a double backward keeps the graph of the gradient, about 2-3× a backward's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from workers.criteria import _gates
from workers.criteria._common import KINDS, Geometry, check_kinds, decoder_layers, empty, micro_batches
from workers.criteria.base import LayerScores, UnitScores
from workers.criteria.taylor import coupled, unit_sum

CRITERIA = {  # the catalog entry (darwinfront.core.criteria); a job may set the options in prune.criterion_options
    "hessian_trace": {
        "class": "HessianTrace",
        "options": {"probes": {"type": "int", "min": 1, "max": 1024},
                    "seed": {"type": "int", "min": 0, "max": 2147483647}},
    },
}


@dataclass(frozen=True)
class Traces:
    """Hutchinson estimates of Tr(H_SS) per layer and kind: `mean` (n_units,) and its `stderr` over the probes."""

    mean: list[dict[str, torch.Tensor]]
    stderr: list[dict[str, torch.Tensor]]
    probes: int


def _rademacher_like(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(device=w.device, dtype=w.dtype)


def hutchinson(
    model: nn.Module,
    calibration: torch.Tensor,
    kinds: tuple[str, ...] = KINDS,
    *,
    probes: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    attention_unit: str = "kv_group",
) -> Traces:
    """Per-unit Hutchinson traces of the Hessian of T (mean CE over `calibration`) over each unit's coupled weights.

    Per probe, one forward and one double backward per micro-batch. Leaves the model's gradients and flags as found.
    """
    check_kinds(kinds)
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    geo = Geometry.of(model, attention_unit)
    mats = [{kind: coupled(layer, kind) for kind in kinds} for layer in decoder_layers(model)]
    wanted = [lin.weight for per_kind in mats for group in per_kind.values() for lin in group.values()]
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / _gates.predictions(calibration)
    samples = [{kind: [] for kind in kinds} for _ in mats]  # per layer, kind: one (n_units,) per probe
    # the fused attention kernels (flash, memory-efficient, CPU flash) have no double backward; the math one has
    with _gates.frozen(model), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for w in wanted:
            w.requires_grad_(True)
        for _ in range(probes):
            v = [_rademacher_like(w, gen) for w in wanted]
            acc = [{kind: torch.zeros(_gates.n_units(kind, geo), dtype=torch.float64) for kind in kinds} for _ in mats]
            for ids in micro_batches(calibration, batch_size):
                loss = _gates.sample_ce(model, ids).sum() * scale
                grads = torch.autograd.grad(loss, wanted, create_graph=True)
                hv = iter(torch.autograd.grad(sum((g * p).sum() for g, p in zip(grads, v, strict=True)), wanted))
                vs = iter(v)
                for per_kind, a in zip(mats, acc, strict=True):
                    for kind, group in per_kind.items():
                        vhv = {name: (next(vs) * next(hv)).detach().to(torch.float64) for name in group}
                        a[kind] += unit_sum(vhv, kind, geo).cpu()
            for per_layer, a in zip(samples, acc, strict=True):
                for kind in kinds:
                    per_layer[kind].append(a[kind])
    stacked = [{kind: torch.stack(s) for kind, s in per_layer.items()} for per_layer in samples]  # (K, n_units)
    mean = [{k: s.mean(0) for k, s in per_layer.items()} for per_layer in stacked]
    err = [{k: (s.std(0) / probes**0.5 if probes > 1 else torch.full_like(s[0], float("inf")))
            for k, s in per_layer.items()} for per_layer in stacked]
    return Traces(mean, err, probes)


def weight_norms(model: nn.Module, kind: str, layer: int, geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_S, ‖W_S‖²) per unit of `kind` in decoder layer `layer` (fp64, CPU)."""
    group = coupled(decoder_layers(model)[layer], kind)
    weights = {name: lin.weight.detach().to(torch.float64) for name, lin in group.items()}
    count = unit_sum({name: torch.ones_like(w) for name, w in weights.items()}, kind, geo).cpu()
    return count, unit_sum({name: w * w for name, w in weights.items()}, kind, geo).cpu()


class HessianTrace:
    """HAP's relative Hessian trace per unit, Tr(H_SS)/n_S · ‖W_S‖², Hutchinson-estimated; higher = keep.

    Args:
        probes: Rademacher probes (one double backward over the calibration set each).
        seed: seeds the probes.
        batch_size: sequences per forward pass.
        attention_unit: "kv_group" or "q_head".
    """

    name = "hessian_trace"

    def __init__(self, probes: int = 8, seed: int = 0, batch_size: int = 8, attention_unit: str = "kv_group"):
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        self.probes, self.seed, self.batch_size = probes, seed, batch_size
        self.attention_unit = attention_unit

    def score(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> UnitScores:
        """`probes` forward + double-backward passes; scores every attention unit / MLP channel of `kinds`."""
        geo = Geometry.of(model, self.attention_unit)
        traces = hutchinson(model, calibration, kinds, probes=self.probes, seed=self.seed,
                            batch_size=self.batch_size, attention_unit=self.attention_unit)
        layers = []
        for i, per_kind in enumerate(traces.mean):
            out = {k: empty() for k in KINDS}
            for kind, trace in per_kind.items():
                count, norm2 = weight_norms(model, kind, i, geo)
                out[kind] = trace / count * norm2
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)
