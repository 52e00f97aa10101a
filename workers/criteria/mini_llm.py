"""MINI-LLM hybrid: magnitude × activation × forward-only gradient, (Σ_j Σ_i |W_ij|·‖X_j‖)·|ĝ_u| (Cheng et al. 2024).

MINI-LLM's feature-map sensitivity fuses a unit's weight magnitude, its input activation norm and its loss
gradient, the gradient estimated from forward passes only so that scoring costs inference memory. Here the first
two factors are Wanda-sp's Σ_{j∈u} Σ_i |W_ij|·‖X_j‖₂ over the unit's o_proj / down_proj input columns j (one
forward pass), and ĝ_u is an SPSA estimate of ∂T/∂m_u, the derivative of the mean next-token cross-entropy along
the unit's gate m_u (= 1) on those columns: ĝ = mean_k (T(1 + εz_k) − T(1 − εz_k))/2ε · z_k with seeded
Rademacher z_k over one layer's gates of one kind, each T run from that layer on cached dense inputs
(`gate.spsa_gradients`). ∂T/∂m_u = Σ_{i, j∈u} W_ij·∂T/∂W_ij, the unit's aggregated weight gradient.

What differs from the paper: MINI-LLM perturbs the weights themselves (MeZO-style) and multiplies per weight; with
every weight of a layer perturbed at once each coordinate's estimate is mostly its own probe, |ĝ_i| ≈ |z_i|·const,
and the ranking collapses to |W|·‖X‖ (saliency.md §2.5). The estimate is taken on the unit gates instead, where
the dimension is a layer's unit count: E cos(ĝ, g) ≈ √(K/(K + d + 1)) for K probes over d gates, so attention
units (d = a few KV groups) are well estimated and MLP channels (d = the MLP width) need many probes. Cost: 2K
forward passes per layer and kind, from that layer on; no backward, so memory is that of a forward pass plus the
cached layer inputs. A unit with a zero input or zero output weights scores exactly 0. In bf16 the gates round
at 2⁻⁸, so set `eps` ≥ 0.032 (`prune.criterion_options`); a smaller one is refused with that advice.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.criteria._common import (
    KINDS,
    Geometry,
    check_kinds,
    decoder_layers,
    empty,
    input_stats,
    target_linear,
    unit_reduce,
)
from workers.criteria.base import LayerScores, UnitScores
from workers.criteria.gate import spsa_gradients
from workers.criteria.wanda_sp import wanda_columns

CRITERIA = {  # the catalog entry (darwinfront.core.criteria); a job may set the options in prune.criterion_options
    "mini_llm": {
        "class": "MiniLLM",
        "options": {"probes": {"type": "int", "min": 1, "max": 4096},
                    "eps": {"type": "float", "min": 1e-6, "max": 0.5},
                    "seed": {"type": "int", "min": 0, "max": 2147483647}},
    },
}


class MiniLLM:
    """MINI-LLM's hybrid criterion with a forward-only (SPSA) gate gradient; higher = keep.

    Args:
        probes: SPSA probes per layer and kind (2 forward passes from that layer each).
        eps: SPSA perturbation size of the gates.
        seed: seeds the probes.
        batch_size: sequences per forward pass.
        attention_unit: "kv_group" or "q_head".
    """

    name = "mini_llm"

    def __init__(self, probes: int = 64, eps: float = 1e-3, seed: int = 0, batch_size: int = 8,
                 attention_unit: str = "kv_group"):
        if probes < 1 or not eps > 0:
            raise ValueError(f"need probes >= 1 and eps > 0, got {probes} and {eps}")
        self.probes, self.eps, self.seed, self.batch_size = probes, eps, seed, batch_size
        self.attention_unit = attention_unit

    def score(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> UnitScores:
        """Forward passes only: one for the activation norms, 2·probes per layer and kind for the gradients."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        stats = input_stats(model, calibration, kinds, self.batch_size)
        grads = spsa_gradients(model, calibration, kinds, probes=self.probes, eps=self.eps, seed=self.seed,
                               batch_size=self.batch_size, attention_unit=self.attention_unit)
        layers = []
        for layer, st, g in zip(decoder_layers(model), stats, grads, strict=True):
            out = {k: empty() for k in KINDS}
            for kind in kinds:
                wanda = unit_reduce(wanda_columns(target_linear(layer, kind).weight, st[kind].norm), kind, geo)
                out[kind] = wanda.cpu() * g[kind].abs()
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)
