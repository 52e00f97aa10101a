"""A Phi-3 model pruned by darwinfront: per-layer query heads, KV heads and MLP widths (0 = removed).

Load it with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; needs torch and transformers
only. The classes subclass transformers' own Phi-3 classes and change the widths of each layer (`layer_shapes`
in the config, described in `pruned_layers.py`) and one thing more: Phi-3 fuses the query, key and value
projections into `qkv_proj` and the MLP's gate and up projections into `gate_up_proj`; here they are stored
apart (`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`), the rows of each taken from the fused matrix in
its order, so a cut keeps each unit's rows whole and the forward is Phi-3's own arithmetic.
`PrunedPhi3Attention.unfuse` / `PrunedPhi3MLP.unfuse` turn a stock Phi-3 module into this form.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.phi3.configuration_phi3 import Phi3Config
from transformers.models.phi3.modeling_phi3 import (
    Phi3Attention,
    Phi3ForCausalLM,
    Phi3MLP,
    Phi3Model,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .pruned_layers import attend_with_kv_index, cut_layers, layer_config, set_kv_heads, settle_layer_shapes


@strict
class PrunedPhi3Config(Phi3Config):
    """Phi3Config plus `layer_shapes`: one {num_attention_heads, num_key_value_heads, intermediate_size,
    kv_head_of_query} per layer."""

    model_type = "darwinfront_phi3"
    layer_shapes: list[dict] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        settle_layer_shapes(self)


def _widths(config, layer_idx: int):
    """Layer `layer_idx`'s widths: its `layer_shapes` entry in a pruned config, the dense ones in a stock one."""
    return layer_config(config, layer_idx) if getattr(config, "layer_shapes", None) else config


def _holding(weight: torch.Tensor) -> nn.Linear:
    """A bias-free linear (Phi-3's projections have none) holding a copy of `weight` (out, in)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


class PrunedPhi3Attention(Phi3Attention):
    """Phi3Attention at one layer's widths with q, k and v projections stored apart; with an uneven grouping,
    query heads read their KV heads through `kv_head_of_query`."""

    def __init__(self, config: Phi3Config, layer_idx: int):
        widths = _widths(config, layer_idx)
        super().__init__(widths, layer_idx)
        self.config = config  # the model's own: the attention implementation is read from it at each call
        del self.qkv_proj
        q_rows, kv_rows = widths.num_attention_heads * self.head_dim, widths.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_rows, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_rows, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_rows, bias=False)
        self.sliding_window = getattr(config, "sliding_window", None)
        shapes = getattr(config, "layer_shapes", None)
        set_kv_heads(self, shapes[layer_idx]["kv_head_of_query"] if shapes else None)

    @classmethod
    def unfuse(cls, attention: Phi3Attention) -> PrunedPhi3Attention:
        """The same attention as a stock `attention`: its model's config, qkv_proj's rows split in their order
        (queries, keys, values), its o_proj."""
        with torch.device("meta"):  # the fused matrix's rows are copied in below
            new = cls(attention.config, attention.layer_idx)
        rows = [new.q_proj.out_features, new.k_proj.out_features, new.v_proj.out_features]
        new.q_proj, new.k_proj, new.v_proj = map(_holding, attention.qkv_proj.weight.split(rows, dim=0))
        new.o_proj = attention.o_proj
        return new

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        return attend_with_kv_index(self, hidden_states, position_embeddings, attention_mask, cache,
                                    rotary=apply_rotary_pos_emb, eager=eager_attention_forward,
                                    attention_functions=ALL_ATTENTION_FUNCTIONS, **kwargs)


class PrunedPhi3MLP(Phi3MLP):
    """Phi3MLP with its gate and up projections stored apart: `down(up(x) * act(gate(x)))`."""

    def __init__(self, config: Phi3Config):
        super().__init__(config)
        del self.gate_up_proj
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    @classmethod
    def unfuse(cls, mlp: Phi3MLP) -> PrunedPhi3MLP:
        """The same MLP as a stock `mlp` (gate_up_proj's first half is the gate, its second the up)."""
        with torch.device("meta"):
            new = cls(mlp.config)
        new.gate_proj, new.up_proj = map(_holding, mlp.gate_up_proj.weight.chunk(2, dim=0))
        new.down_proj = mlp.down_proj
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(hidden_states) * self.activation_fn(self.gate_proj(hidden_states)))


class PrunedPhi3Model(Phi3Model):
    config_class = PrunedPhi3Config

    def __init__(self, config: PrunedPhi3Config):
        super().__init__(config)
        cut_layers(self, PrunedPhi3Attention, PrunedPhi3MLP)
        self.post_init()


class PrunedPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = PrunedPhi3Config

    def __init__(self, config: PrunedPhi3Config):
        super().__init__(config)
        self.model = PrunedPhi3Model(config)
        self.post_init()
