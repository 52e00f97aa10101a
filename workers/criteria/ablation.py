"""Ablation: the exact ΔKL of removing each unit (or a whole attention / MLP sub-layer) alone.

A unit is removed by setting its gate on the o_proj / down_proj input to 0 (and, where the q/k norms span the
whole projection, OLMo 2, by taking their statistic over the other units' rows, as its removal does); the score is
KL(p_dense ‖ p_ablated) averaged over every calibration token, against the dense model's own next-token
distributions. One forward pass over the calibration set per unit, restarted at the unit's layer from cached
dense inputs (`Replay`): the exact oracle the cheaper criteria are
measured against (saliency.md §6.10), and block scores for sub-layer pruning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from workers import families, metrics, slicing
from workers.criteria import _gates
from workers.criteria._common import KINDS, Geometry, check_kinds, decoder_layers, empty
from workers.criteria._replay import Replay
from workers.criteria.base import LayerScores, UnitScores

CRITERIA = {"ablation": {"class": "Ablation"}}  # the catalog entry (darwinfront.core.criteria)


@dataclass(frozen=True)
class BlockScores:
    """ΔKL of removing each layer's whole attention (`attn`) or MLP (`mlp`) sub-layer, both (n_layers,)."""

    attn: torch.Tensor
    mlp: torch.Tensor


def _replay_kl(replay: Replay, start: int, dense: list[torch.Tensor]) -> float:
    """KL(p_dense ‖ p_model) averaged over every position of every sequence, for a change at layer `start` or
    above: only layers start.. run again."""
    total, count = 0.0, 0
    for (ids, logits), ref in zip(replay.logits(start), dense, strict=True):
        total += metrics.kl_sum(ref, torch.log_softmax(logits, -1)).item()  # (B, T, vocab) both
        count += ids.numel()
    return total / count


class Ablation:
    """Exact single-unit ablation ΔKL (higher = keep); `blocks` scores whole sub-layers the same way."""

    name = "ablation"

    def __init__(self, batch_size: int = 8, attention_unit: str = "kv_group"):
        self.batch_size = batch_size
        self.attention_unit = attention_unit

    def score(self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS) -> UnitScores:
        """ΔKL of removing each attention unit / MLP channel of `kinds` alone, one layer at a time."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        replay = Replay(model, calibration, self.batch_size)
        dense = [torch.log_softmax(logits, -1) for _, logits in replay.logits(0)]
        gates = _gates.ones(geo, kinds, device=next(model.parameters()).device)
        layers = []
        with _gates.gated(model, gates):
            for start, per_kind in enumerate(gates):
                out = {k: empty() for k in KINDS}
                for kind, m in per_kind.items():
                    scores = torch.empty(m.numel(), dtype=torch.float64)
                    for u in range(m.numel()):
                        m[u] = 0.0
                        with self._norms_without(model, geo, start, kind, u):
                            scores[u] = _replay_kl(replay, start, dense)
                        m[u] = 1.0
                    out[kind] = scores
                layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)

    def _norms_without(self, model: nn.Module, geo: Geometry, layer: int, kind: str, unit: int):
        """The whole-projection q/k norms of `layer` taking their statistic without attention unit `unit`
        (OLMo 2); nothing to do for an MLP unit or a family with no such norms."""
        if kind != "attn" or not families.shape(model).projection_norms:
            return contextlib.nullcontext()
        attn = decoder_layers(model)[layer].self_attn
        q_keep = torch.ones(geo.attn_units * geo.attn_width, device=attn.o_proj.weight.device)
        q_keep[unit * geo.attn_width:(unit + 1) * geo.attn_width] = 0
        kv_keep = None
        if self.attention_unit == "kv_group":
            kv_keep = torch.ones(attn.k_proj.out_features, device=q_keep.device)
            kv_keep[unit * geo.head_dim:(unit + 1) * geo.head_dim] = 0
        return slicing.kept_rows_norms(attn, q_keep, kv_keep)

    def blocks(self, model: nn.Module, calibration: torch.Tensor) -> BlockScores:
        """ΔKL of zeroing each attention / MLP sub-layer's output (o_proj / down_proj biases, if any, stay)."""
        geo = Geometry.of(model)
        replay = Replay(model, calibration, self.batch_size)
        dense = [torch.log_softmax(logits, -1) for _, logits in replay.logits(0)]
        gates = _gates.ones(geo, KINDS, device=next(model.parameters()).device)
        scores = {kind: torch.empty(geo.n_layers, dtype=torch.float64) for kind in KINDS}
        with _gates.gated(model, gates):
            for start, per_kind in enumerate(gates):
                for kind, m in per_kind.items():
                    m.zero_()
                    scores[kind][start] = _replay_kl(replay, start, dense)
                    m.fill_(1.0)
        return BlockScores(**scores)
