"""The attention a `q_head` cut leaves in place in a dense model: some query heads kept, every K/V head kept.

`workers.slicing` installs it; the stand-ins for a removed attention or MLP, and the forward it runs, are the
exported models' own (`workers.pruned_hf.pruned_layers`), so a sliced model computes what its export does.
"""

from __future__ import annotations

import torch
from torch import nn

from workers import families
from workers.pruned_hf.pruned_layers import attend_with_kv_index, set_kv_heads


class QueryHeadAttention(nn.Module):
    """Self-attention that keeps some query heads and every K/V head (the `q_head` cut).

    Each kept query head reads the KV head it read in the dense model (`kv_head_of_query`, as the exported config
    records it). Runs the family's rotary and eager attention (`workers.families`), its per-head q/k norms and
    its soft-capping where it has them.
    """

    def __init__(self, attn: nn.Module, heads: tuple[int, ...], group: int, family: families.Family):
        super().__init__()
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.attention_dropout, self.is_causal = attn.attention_dropout, attn.is_causal
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.projection_norms = family.projection_norms
        if family.head_norms or family.projection_norms:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.softcap = attn.attn_logit_softcapping if family.softcap else None
        self._family = family.transformers_code()  # the rotary and eager attention of the model's family
        set_kv_heads(self, [h // group for h in heads])

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        extra = {"softcap": self.softcap} if self.softcap is not None else {}
        return attend_with_kv_index(self, hidden_states, position_embeddings, attention_mask, cache,
                                    rotary=self._family.apply_rotary_pos_emb,
                                    eager=self._family.eager_attention_forward,
                                    attention_functions=ALL_ATTENTION_FUNCTIONS, **extra, **kwargs)
