"""A GPT-NeoX (Pythia) model pruned by darwinfront: per-layer query heads, KV heads and MLP widths (0 = removed).

Load it with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; needs torch and transformers
only. The classes subclass transformers' own GPT-NeoX classes and change the widths of each layer (`layer_shapes`
in the config, described in `pruned_layers.py`) and how the weights are held:

- GPT-NeoX fuses the attention's projections into `query_key_value`, whose rows interleave the heads (head n's
  query rows, then its key rows, then its value rows: 3 x head_size rows per head). Here they are stored apart as
  `q_proj`, `k_proj`, `v_proj` (each head's rows taken from the fused matrix), the output projection `dense` as
  `o_proj`, so a cut keeps each head's rows whole.
- The MLP (`dense_h_to_4h`, GELU, `dense_4h_to_h`; not gated) is `up_proj`, `down_proj`.
- The decoder stack is `model` (GPT-NeoX's `gpt_neox`), each layer's attention `self_attn`.

The arithmetic is GPT-NeoX's own: partial rotary, parallel (or sequential) residual, LayerNorms with biases.
`PrunedGPTNeoXLayer.unfuse` turns a stock GPT-NeoX layer into this form.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.configuration_gpt_neox import GPTNeoXConfig
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXAttention,
    GPTNeoXForCausalLM,
    GPTNeoXLayer,
    GPTNeoXModel,
    GPTNeoXPreTrainedModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .pruned_layers import attend_with_kv_index, cut_layers, layer_config, set_kv_heads, settle_layer_shapes


@strict
class PrunedGPTNeoXConfig(GPTNeoXConfig):
    """GPTNeoXConfig plus `layer_shapes`: one {num_attention_heads, num_key_value_heads, intermediate_size,
    kv_head_of_query} per layer. GPT-NeoX's attention is multi-head: `num_key_value_heads` is always the query
    heads (the dense count the layer shapes are read against)."""

    model_type = "darwinfront_gpt_neox"
    layer_shapes: list[dict] | None = None
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.num_key_value_heads = self.num_attention_heads
        settle_layer_shapes(self)


def _widths(config, layer_idx: int):
    """Layer `layer_idx`'s widths: its `layer_shapes` entry in a pruned config, the dense ones in a stock one."""
    if getattr(config, "layer_shapes", None):
        return layer_config(config, layer_idx)
    return config


def _holding(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A linear holding copies of `weight` (out, in) and `bias` (out,)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().contiguous().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().contiguous().clone(), requires_grad=bias.requires_grad)
    return linear


class PrunedGPTNeoXAttention(GPTNeoXAttention):
    """GPTNeoXAttention at one layer's widths with the query, key, value and output projections held apart (head
    dimension `hidden / num_attention_heads` of the dense config); with an uneven grouping (a cut of query heads
    alone), query heads read their KV heads through `kv_head_of_query`."""

    def __init__(self, config: GPTNeoXConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.query_key_value, self.dense
        widths = _widths(config, layer_idx)
        self.head_dim = self.head_size
        heads = widths.num_attention_heads
        kv_heads = getattr(widths, "num_key_value_heads", None) or heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)
        self.num_key_value_groups = 1  # GPT-NeoX's attention function expands no keys: one KV head per query head
        shapes = getattr(config, "layer_shapes", None)
        set_kv_heads(self, shapes[layer_idx]["kv_head_of_query"] if shapes else None)

    @classmethod
    def unfuse(cls, attention: GPTNeoXAttention) -> PrunedGPTNeoXAttention:
        """The same attention as a stock `attention`: query_key_value's rows de-interleaved per head, its `dense`
        as o_proj."""
        config = attention.config
        with torch.device("meta"):  # the fused matrix's rows are copied in below
            new = cls(config, attention.layer_idx)
        fused = attention.query_key_value
        heads, h = config.num_attention_heads, attention.head_size
        weight = fused.weight.view(heads, 3, h, config.hidden_size)  # head-major: each head's q, k, v rows
        bias = None if fused.bias is None else fused.bias.view(heads, 3, h)
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = weight[:, part].reshape(heads * h, config.hidden_size)
            setattr(new, name, _holding(rows, None if bias is None else bias[:, part].reshape(-1)))
        new.o_proj = attention.dense
        return new.train(attention.training)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        return attend_with_kv_index(self, hidden_states, position_embeddings, attention_mask, cache,
                                    rotary=apply_rotary_pos_emb, eager=eager_attention_forward,
                                    attention_functions=ALL_ATTENTION_FUNCTIONS, **kwargs)


class PrunedGPTNeoXMLP(nn.Module):
    """GPT-NeoX's MLP at one layer's width: `down_proj(act(up_proj(x)))`, both with biases."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    @classmethod
    def unfuse(cls, mlp: nn.Module, config: GPTNeoXConfig) -> PrunedGPTNeoXMLP:
        """The same MLP as a stock GPTNeoXMLP `mlp`, holding its two linears."""
        with torch.device("meta"):
            new = cls(config)
        new.up_proj, new.down_proj = mlp.dense_h_to_4h, mlp.dense_4h_to_h
        return new.train(mlp.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class PrunedGPTNeoXLayer(GPTNeoXLayer):
    """GPTNeoXLayer with the attention as `self_attn` (`PrunedGPTNeoXAttention`, or a removed attention's stand-in)
    and the MLP as `PrunedGPTNeoXMLP`: x + attn(ln1(x)) + mlp(ln2(x)) with the parallel residual, else
    y = x + attn(ln1(x)), y + mlp(ln2(y))."""

    def __init__(self, config: GPTNeoXConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.attention
        self.self_attn = PrunedGPTNeoXAttention(config, layer_idx)
        self.mlp = PrunedGPTNeoXMLP(_widths(config, layer_idx))

    @classmethod
    def unfuse(cls, layer: GPTNeoXLayer, config: GPTNeoXConfig) -> PrunedGPTNeoXLayer:
        """The same layer as a stock `layer`, holding its norms and its weights in this layout."""
        with torch.device("meta"):
            new = cls(config, layer.attention.layer_idx)
        new.input_layernorm, new.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        new.post_attention_dropout, new.post_mlp_dropout = layer.post_attention_dropout, layer.post_mlp_dropout
        new.self_attn = PrunedGPTNeoXAttention.unfuse(layer.attention)
        new.mlp = PrunedGPTNeoXMLP.unfuse(layer.mlp, config)
        return new.train(layer.training)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False, layer_past=None,
                position_embeddings=None, **kwargs):
        attn_output, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                        attention_mask=attention_mask, cache=layer_past, position_ids=position_ids,
                                        **kwargs)
        attn_output = self.post_attention_dropout(attn_output)
        if self.use_parallel_residual:
            mlp_output = self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
            return mlp_output + attn_output + hidden_states
        attn_output = attn_output + hidden_states
        return self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(attn_output))) + attn_output


class PrunedGPTNeoXModel(GPTNeoXModel):
    config_class = PrunedGPTNeoXConfig

    def __init__(self, config: PrunedGPTNeoXConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(PrunedGPTNeoXLayer(config, i) for i in range(config.num_hidden_layers))
        cut_layers(self, PrunedGPTNeoXAttention, PrunedGPTNeoXMLP)
        self.post_init()


class PrunedGPTNeoXForCausalLM(GPTNeoXForCausalLM):
    """GPTNeoXForCausalLM over `PrunedGPTNeoXModel`, held as `model`: transformers' own forward and generation,
    which read the stack as `gpt_neox` (an alias of `model` here, not a second copy)."""

    config_class = PrunedGPTNeoXConfig
    base_model_prefix = "model"
    _no_split_modules = ["PrunedGPTNeoXLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_in.weight"}

    def __init__(self, config: PrunedGPTNeoXConfig):
        GPTNeoXPreTrainedModel.__init__(self, config)  # (not GPTNeoXForCausalLM's: it would build a dense stack)
        self.model = PrunedGPTNeoXModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def gpt_neox(self) -> GPTNeoXModel:
        return self.model
