"""Mixture-of-experts families (Mixtral, Qwen3-MoE, OLMoE): Llama's attention (with the family's q/k norms) and,
in place of the MLP, a router over `E` experts, each a gated MLP of width `w`, of which each token uses the
`num_experts_per_tok` the router rates highest.

The unit of the MLP is the expert: a level removes whole experts of a layer, their router rows with them, and
the router then chooses among the experts left (top-k capped at their number); removing every expert removes
the MLP. The adapter puts each sparse block in darwinfront's layout once (`canonical`): a `MoEMLP`
(`workers.pruned_hf.pruned_layers`) whose experts are blocks of `w` channels of one wide gated MLP, so the
criteria score an expert as the sum of its channels' scores (as they score a KV group by its query heads' columns)
and slicing cuts an expert as a block of channels. Channels inside an expert are not a unit: every kept expert
keeps its width.

Refused with a clear message: layers of dense MLPs among the sparse ones (Qwen3-MoE's `mlp_only_layers`,
`decoder_sparse_step` above 1). The router's load-balancing loss is not computed (`output_router_logits` is set
off): darwinfront's short training distils the dense model's outputs and does not train the router to balance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from darwinfront.core.errors import InvalidSpec

from .base import Family, Shape


@dataclass(frozen=True)
class MoEFamily(Family):
    """A family whose MLPs are sparse mixture-of-experts blocks (`.mlp.gate`: the router, `.mlp.experts`: 3-D
    `gate_up_proj` (E, 2w, hidden) and `down_proj` (E, hidden, w))."""

    width_key: str = "intermediate_size"  # the config key of an expert's width
    always_normalize: bool = False  # the chosen experts' weights always renormalised (Mixtral)

    def expert_width(self, config) -> int:
        return getattr(config, self.width_key)

    def canonical(self, model: nn.Module) -> None:
        from workers.pruned_hf.pruned_layers import MoEMLP

        config = model.config
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise InvalidSpec("model.source", f"{self.architecture} with dense MLP layers among the sparse ones "
                              "(mlp_only_layers, decoder_sparse_step > 1) is not supported: darwinfront prunes "
                              "models whose every layer is a mixture of experts")
        if getattr(config, "clip_qkv", None) is not None:
            raise InvalidSpec("model.source", f"{self.architecture} with clip_qkv is not supported")
        config.output_router_logits = False
        for layer in self.layers(model):
            block = layer.mlp
            if isinstance(block, MoEMLP) or getattr(block, "darwinfront_empty", False):
                continue
            if getattr(block, "shared_expert", None) is not None:
                raise InvalidSpec("model.source", f"{self.architecture}: shared experts are not supported")
            layer.mlp = self.unfuse(block, config)

    def unfuse(self, block: nn.Module, config) -> nn.Module:
        """The `MoEMLP` computing what the stock sparse block `block` computes, on its device and in its dtype."""
        from workers.pruned_hf.pruned_layers import MoEMLP

        experts = block.experts
        n, width, hidden = experts.num_experts, experts.intermediate_dim, experts.hidden_dim
        normalize = self.always_normalize or bool(getattr(config, "norm_topk_prob", False))
        like = experts.down_proj
        with torch.device("meta"):
            mlp = MoEMLP(hidden, n, width, block.gate.top_k, normalize, config.hidden_act)
        gate_up = experts.gate_up_proj.detach()  # (E, 2w, hidden): each expert's gate rows, then its up rows
        weights = {
            "router.weight": block.gate.weight.detach(),  # (E, hidden)
            "gate_proj.weight": gate_up[:, :width].reshape(n * width, hidden),
            "up_proj.weight": gate_up[:, width:].reshape(n * width, hidden),
            "down_proj.weight": experts.down_proj.detach().permute(1, 0, 2).reshape(hidden, n * width),
        }
        mlp.load_state_dict({k: v.contiguous() for k, v in weights.items()}, assign=True)
        mlp.requires_grad_(like.requires_grad)
        return mlp.train(block.training)

    def shape(self, model: nn.Module) -> Shape:
        width = self.expert_width(model.config)
        experts = _num_experts(model.config)
        return replace(super().shape(model), intermediate=experts * width, experts=experts)


def _num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts
