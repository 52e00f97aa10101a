"""A Gemma 2 model pruned by darwinfront: per-layer query heads, KV heads and MLP widths (0 = removed).

Load it with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; needs torch and transformers
only. The classes subclass transformers' own Gemma2 classes and change only the widths of each layer
(`layer_shapes` in the config, described in `pruned_layers.py`).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
from transformers.models.gemma2.modeling_gemma2 import (
    Gemma2Attention,
    Gemma2ForCausalLM,
    Gemma2MLP,
    Gemma2Model,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .pruned_layers import attend_with_kv_index, cut_layers, layer_config, set_kv_heads, settle_layer_shapes


@strict
class PrunedGemma2Config(Gemma2Config):
    """Gemma2Config plus `layer_shapes`: one {num_attention_heads, num_key_value_heads, intermediate_size,
    kv_head_of_query} per layer."""

    model_type = "darwinfront_gemma2"
    layer_shapes: list[dict] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        settle_layer_shapes(self)


class PrunedGemma2Attention(Gemma2Attention):
    """Gemma2Attention at one layer's widths; with an uneven grouping, query heads read their KV heads through
    `kv_head_of_query`."""

    def __init__(self, config: PrunedGemma2Config, layer_idx: int):
        super().__init__(layer_config(config, layer_idx), layer_idx)
        self.config = config  # the model's own: the attention implementation is read from it at each call
        set_kv_heads(self, config.layer_shapes[layer_idx]["kv_head_of_query"])

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if self.kv_head_of_query is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        return attend_with_kv_index(self, hidden_states, position_embeddings, attention_mask, cache,
                                    rotary=apply_rotary_pos_emb, eager=eager_attention_forward,
                                    attention_functions=ALL_ATTENTION_FUNCTIONS,
                                    softcap=self.attn_logit_softcapping, **kwargs)


class PrunedGemma2Model(Gemma2Model):
    config_class = PrunedGemma2Config

    def __init__(self, config: PrunedGemma2Config):
        super().__init__(config)
        cut_layers(self, PrunedGemma2Attention, Gemma2MLP)
        self.post_init()


class PrunedGemma2ForCausalLM(Gemma2ForCausalLM):
    config_class = PrunedGemma2Config

    def __init__(self, config: PrunedGemma2Config):
        super().__init__(config)
        self.model = PrunedGemma2Model(config)
        self.post_init()
