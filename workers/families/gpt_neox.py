"""GPT-NeoX / Pythia: multi-head attention fused into one `query_key_value` whose rows interleave the heads,
partial rotary, a non-gated GELU MLP (`dense_h_to_4h`, `dense_4h_to_h`), biases on every linear, LayerNorms, and
a parallel residual (x + attn(ln1(x)) + mlp(ln2(x))) where the config says so.

The adapter puts a stock model in the exported model's layout at the first look (`canonical`): each decoder
layer becomes a `PrunedGPTNeoXLayer` (`workers.pruned_hf.modeling_pruned_gpt_neox`) holding each head's query,
key and value rows apart as q/k/v_proj and the MLP as up_proj / down_proj, the stack moves from `gpt_neox` to
`model`, and the model becomes the exported class (a subclass of the stock one, whose own forward it runs). So a
head owns its rows of each part and a channel its up row (with its bias) and down column, and everything
downstream reads Llama's layout; the MLP has no gate (`Shape.gated` false).
"""

from __future__ import annotations

from torch import nn

from .base import Family


class GPTNeoXFamily(Family):
    def canonical(self, model: nn.Module) -> None:
        from workers.pruned_hf.modeling_pruned_gpt_neox import PrunedGPTNeoXForCausalLM, PrunedGPTNeoXLayer

        model.config.num_key_value_heads = model.config.num_attention_heads  # multi-head, whatever a config says
        if isinstance(model, PrunedGPTNeoXForCausalLM):
            return
        body = model.gpt_neox
        body.layers = nn.ModuleList(PrunedGPTNeoXLayer.unfuse(layer, model.config) for layer in body.layers)
        del model.gpt_neox
        model.model = body
        model.__class__ = PrunedGPTNeoXForCausalLM

    @staticmethod
    def final_norm(model: nn.Module) -> nn.Module:
        return model.model.final_layer_norm


FAMILY = GPTNeoXFamily("gpt_neox", "GPTNeoX", "transformers.models.gpt_neox.modeling_gpt_neox", gated=False)
