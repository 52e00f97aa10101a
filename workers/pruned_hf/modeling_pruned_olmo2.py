"""A Olmo2 model pruned by darwinfront: per-layer query heads, KV heads and MLP widths (0 = removed).

Load it with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; needs torch and transformers
only. The classes subclass transformers' own OLMo 2 classes and change only the widths of each layer
(`layer_shapes` in the config, described in `pruned_layers.py`); a layer's q and k norms span its kept query and
key rows, as OLMo 2's span the whole projection.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.olmo2.configuration_olmo2 import Olmo2Config
from transformers.models.olmo2.modeling_olmo2 import (
    Olmo2Attention,
    Olmo2ForCausalLM,
    Olmo2MLP,
    Olmo2Model,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .pruned_layers import attend_with_kv_index, cut_layers, layer_config, set_kv_heads, settle_layer_shapes


@strict
class PrunedOlmo2Config(Olmo2Config):
    """Olmo2Config plus `layer_shapes`: one {num_attention_heads, num_key_value_heads, intermediate_size,
    kv_head_of_query} per layer."""

    model_type = "darwinfront_olmo2"
    layer_shapes: list[dict] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        settle_layer_shapes(self)


class PrunedOlmo2Attention(Olmo2Attention):
    """Olmo2Attention at one layer's widths; with an uneven grouping, query heads read their KV heads through
    `kv_head_of_query`."""

    projection_norms = True  # q_norm / k_norm over the whole projection, before the heads are split

    def __init__(self, config: PrunedOlmo2Config, layer_idx: int):
        super().__init__(layer_config(config, layer_idx), layer_idx)
        self.config = config  # the model's own: the attention implementation is read from it at each call
        set_kv_heads(self, config.layer_shapes[layer_idx]["kv_head_of_query"])

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if self.kv_head_of_query is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        return attend_with_kv_index(self, hidden_states, position_embeddings, attention_mask, cache,
                                    rotary=apply_rotary_pos_emb, eager=eager_attention_forward,
                                    attention_functions=ALL_ATTENTION_FUNCTIONS, **kwargs)


class PrunedOlmo2Model(Olmo2Model):
    config_class = PrunedOlmo2Config

    def __init__(self, config: PrunedOlmo2Config):
        super().__init__(config)
        cut_layers(self, PrunedOlmo2Attention, Olmo2MLP)
        self.post_init()


class PrunedOlmo2ForCausalLM(Olmo2ForCausalLM):
    config_class = PrunedOlmo2Config

    def __init__(self, config: PrunedOlmo2Config):
        super().__init__(config)
        self.model = PrunedOlmo2Model(config)
        self.post_init()
