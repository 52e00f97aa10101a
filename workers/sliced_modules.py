"""The modules a sliced decoder layer is rebuilt with: attention that keeps some query heads and every K/V head,
and stand-ins for an attention or MLP that keeps no unit. `workers.slicing` installs them."""

from __future__ import annotations

import sys

import torch
from torch import nn


class QueryHeadAttention(nn.Module):
    """Self-attention that keeps some query heads and every K/V head (the `q_head` cut).

    Each kept query head reads the KV head it read in the dense model (`kv_index`, not saved: the layout holds
    it). Keys and values are cached once per KV head and expanded to the kept query heads just before the
    model's own attention function (eager, sdpa, ...) runs, so the cache is as small as the dense model's.
    Works for the architectures `workers.modeling` supports (Llama, Mistral, Qwen2).
    """

    def __init__(self, attn: nn.Module, heads: tuple[int, ...], group: int):
        super().__init__()
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.attention_dropout, self.is_causal = attn.attention_dropout, attn.is_causal
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.num_key_value_groups = 1  # keys and values arrive already expanded to the kept heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self._rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        kv_index = torch.tensor([h // group for h in heads], dtype=torch.long, device=attn.o_proj.weight.device)
        self.register_buffer("kv_index", kv_index, persistent=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, kept heads, T, h)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, KV heads, T, h)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self._rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        key, value = key.index_select(1, self.kv_index), value.index_select(1, self.kv_index)  # (B, kept, S, h)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if self.sliding_window is not None else {}
        out, weights = attend(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **extra, **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class NoAttention(nn.Module):
    """Stands in for a self-attention block that keeps no attention unit: returns its output bias (or zeros).

    It still writes a one-wide zero placeholder into the KV cache, so the cache counts this layer's tokens
    (transformers reads the sequence length from the first layer).
    """

    darwinfront_empty = True

    def __init__(self, layer_idx: int, hidden: int, bias: torch.Tensor | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden = hidden
        self.o_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        batch, seq = hidden_states.shape[:2]
        if cache is not None:
            placeholder = hidden_states.new_zeros(batch, 1, seq, 1)  # (B, 1 head, T, width 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        out = hidden_states.new_zeros(batch, seq, self.hidden)  # (B, T, hidden)
        return (out if self.o_bias is None else out + self.o_bias), None


class NoMLP(nn.Module):
    """Stands in for an MLP that keeps no channel: returns its output bias (or zeros)."""

    darwinfront_empty = True

    def __init__(self, hidden: int, bias: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden
        self.down_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.hidden)
        return out if self.down_bias is None else out + self.down_bias
