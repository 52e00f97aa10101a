"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama's layer with the query, key and value projections fused into one
`qkv_proj` (rows: every query head, then every key head, then every value head) and the MLP's gate and up
projections into one `gate_up_proj` (gate rows, then up rows); partial rotary where the config asks for it
(Phi-4-mini); a sliding window over every layer where the config sets one.

The adapter splits the fused matrices at the first look (`canonical`): each decoder layer's attention and MLP
become the exported model's own modules (`workers.pruned_hf.modeling_pruned_phi3`), which hold the same rows
apart and compute what Phi-3's do, so a KV group still owns its rows of each part and a channel its gate row,
up row and down column, and everything downstream reads Llama's layout."""

from __future__ import annotations

from torch import nn

from .base import Family


class Phi3Family(Family):
    def canonical(self, model: nn.Module) -> None:
        from workers.pruned_hf.modeling_pruned_phi3 import PrunedPhi3Attention, PrunedPhi3MLP

        for layer in self.layers(model):
            if hasattr(layer.self_attn, "qkv_proj"):
                layer.self_attn = PrunedPhi3Attention.unfuse(layer.self_attn)
            if hasattr(layer.mlp, "gate_up_proj"):
                layer.mlp = PrunedPhi3MLP.unfuse(layer.mlp)


FAMILY = Phi3Family("phi3", "Phi3", "transformers.models.phi3.modeling_phi3")
