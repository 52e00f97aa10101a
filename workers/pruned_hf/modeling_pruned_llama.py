"""A Llama model pruned by darwinfront: per-layer query heads, KV heads and MLP widths (0 = removed).

Load it with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; needs torch and transformers
only. The classes subclass transformers' own Llama classes and change only the widths of each layer
(`layer_shapes` in the config, described in `pruned_layers.py`).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .pruned_layers import attend_with_kv_index, cut_layers, layer_config, set_kv_heads, settle_layer_shapes


@strict
class PrunedLlamaConfig(LlamaConfig):
    """LlamaConfig plus `layer_shapes`: one {num_attention_heads, num_key_value_heads, intermediate_size,
    kv_head_of_query} per layer."""

    model_type = "darwinfront_llama"
    layer_shapes: list[dict] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        settle_layer_shapes(self)


class PrunedLlamaAttention(LlamaAttention):
    """LlamaAttention at one layer's widths; with an uneven grouping, query heads read their KV heads through
    `kv_head_of_query`."""

    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        super().__init__(layer_config(config, layer_idx), layer_idx)
        self.config = config  # the model's own: the attention implementation is read from it at each call
        set_kv_heads(self, config.layer_shapes[layer_idx]["kv_head_of_query"])

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if self.kv_head_of_query is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        return attend_with_kv_index(self, hidden_states, position_embeddings, attention_mask, cache,
                                    rotary=apply_rotary_pos_emb, eager=eager_attention_forward,
                                    attention_functions=ALL_ATTENTION_FUNCTIONS, **kwargs)


class PrunedLlamaModel(LlamaModel):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        cut_layers(self, PrunedLlamaAttention, LlamaMLP)
        self.post_init()


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        self.model = PrunedLlamaModel(config)
        self.post_init()
