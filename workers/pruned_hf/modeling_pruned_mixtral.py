"""A Mixtral model pruned by darwinfront: per-layer query heads, KV heads and experts (0 = removed).

Load it with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; needs torch and transformers
only. The classes subclass transformers' own Mixtral classes and change only the widths of each layer
(`layer_shapes` in the config, described in `pruned_layers.py`); each layer's experts are a `MoEMLP`, which
routes every token among the experts the layer keeps (the chosen experts' weights renormalised, as Mixtral's).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralForCausalLM,
    MixtralModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .pruned_layers import (
    MoEMLP,
    attend_with_kv_index,
    cut_layers,
    layer_config,
    set_kv_heads,
    settle_layer_shapes,
)


@strict
class PrunedMixtralConfig(MixtralConfig):
    """MixtralConfig plus `layer_shapes` (one entry per layer, `pruned_layers.py`) and `expert_width`."""

    model_type = "darwinfront_mixtral"
    layer_shapes: list[dict] | None = None
    expert_width: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.output_router_logits = False  # the router's load-balancing loss is not computed
        if self.expert_width is None:
            self.expert_width = self.intermediate_size
        settle_layer_shapes(self)


class PrunedMixtralAttention(MixtralAttention):
    """MixtralAttention at one layer's widths; with an uneven grouping, query heads read their KV heads through
    `kv_head_of_query`."""

    def __init__(self, config: PrunedMixtralConfig, layer_idx: int):
        super().__init__(layer_config(config, layer_idx), layer_idx)
        self.config = config  # the model's own: the attention implementation is read from it at each call
        set_kv_heads(self, config.layer_shapes[layer_idx]["kv_head_of_query"])

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if self.kv_head_of_query is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        return attend_with_kv_index(self, hidden_states, position_embeddings, attention_mask, cache,
                                    rotary=apply_rotary_pos_emb, eager=eager_attention_forward,
                                    attention_functions=ALL_ATTENTION_FUNCTIONS, **kwargs)


def _experts(config) -> MoEMLP:
    return MoEMLP.from_config(config, normalize=True)


class PrunedMixtralModel(MixtralModel):
    config_class = PrunedMixtralConfig

    def __init__(self, config: PrunedMixtralConfig):
        super().__init__(config)
        cut_layers(self, PrunedMixtralAttention, _experts)
        self.post_init()


class PrunedMixtralForCausalLM(MixtralForCausalLM):
    config_class = PrunedMixtralConfig

    def __init__(self, config: PrunedMixtralConfig):
        super().__init__(config)
        self.model = PrunedMixtralModel(config)
        self.post_init()
