"""A Qwen3 model pruned by darwinfront: per-layer query heads, KV heads and MLP widths (0 = removed).

Load it with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; needs torch and transformers
only. The classes subclass transformers' own Qwen3 classes and change only the widths of each layer
(`layer_shapes` in the config, described in `pruned_layers.py`).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3ForCausalLM,
    Qwen3MLP,
    Qwen3Model,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .pruned_layers import attend_with_kv_index, cut_layers, layer_config, set_kv_heads, settle_layer_shapes


@strict
class PrunedQwen3Config(Qwen3Config):
    """Qwen3Config plus `layer_shapes`: one {num_attention_heads, num_key_value_heads, intermediate_size,
    kv_head_of_query} per layer."""

    model_type = "darwinfront_qwen3"
    layer_shapes: list[dict] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        settle_layer_shapes(self)


class PrunedQwen3Attention(Qwen3Attention):
    """Qwen3Attention at one layer's widths; with an uneven grouping, query heads read their KV heads through
    `kv_head_of_query`."""

    def __init__(self, config: PrunedQwen3Config, layer_idx: int):
        super().__init__(layer_config(config, layer_idx), layer_idx)
        self.config = config  # the model's own: the attention implementation is read from it at each call
        set_kv_heads(self, config.layer_shapes[layer_idx]["kv_head_of_query"])

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if self.kv_head_of_query is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        return attend_with_kv_index(self, hidden_states, position_embeddings, attention_mask, cache,
                                    rotary=apply_rotary_pos_emb, eager=eager_attention_forward,
                                    attention_functions=ALL_ATTENTION_FUNCTIONS, **kwargs)


class PrunedQwen3Model(Qwen3Model):
    config_class = PrunedQwen3Config

    def __init__(self, config: PrunedQwen3Config):
        super().__init__(config)
        cut_layers(self, PrunedQwen3Attention, Qwen3MLP)
        self.post_init()


class PrunedQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = PrunedQwen3Config

    def __init__(self, config: PrunedQwen3Config):
        super().__init__(config)
        self.model = PrunedQwen3Model(config)
        self.post_init()
