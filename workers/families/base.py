"""The adapter every model family gives darwinfront: where a decoder layer's attention and MLP weights live, the
dense unit geometry, what slicing must carry along, and the classes of the exported pruned model.

Every family here keeps the Llama layout inside a decoder layer: `model.model.layers[i].self_attn.{q,k,v,o}_proj`
(heads head-major: query head q owns q_proj rows and o_proj columns [q·h, (q+1)·h) and reads KV head q // r) and
`.mlp.{gate,up,down}_proj` (channel j: row j of gate and up, column j of down; a family whose MLP is not gated has
no gate_proj), the final norm at `model.model.norm`, the LM head at `model.lm_head`. What differs between them is
declared on the adapter: per-head q/k norms (one head_dim weight every head shares, so a cut leaves them as they
are), attention-logit soft-capping, layer types (sliding-window layers). A family with fused or interleaved
projections puts its layers in this layout first (`canonical`: Phi-3 splits `qkv_proj` and `gate_up_proj`); one
whose MLP is a mixture of experts lays its experts out as blocks of channels (`workers.families.moe`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from darwinfront.core.errors import InvalidSpec

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
UNGATED_MLP_PROJ = ("up_proj", "down_proj")
NORMS = ("q_norm", "k_norm")


@dataclass(frozen=True)
class Shape:
    """The dense shape of a decoder stack: what slicing, the criteria and the level tables read."""

    n_layers: int
    hidden: int
    n_kv: int
    group: int  # query heads per KV group
    head_dim: int
    intermediate: int
    attn_bias: bool
    mlp_bias: bool
    attn_extra_params: int = 0  # the attention's parameters outside its units (per-head q/k norms)
    projection_norms: bool = False  # q/k norms over the whole projection: each unit owns its rows' norm weights
    experts: int = 0  # a mixture-of-experts MLP's experts (its units), each `intermediate / experts` channels wide
    gated: bool = True  # the MLP has a gate_proj (a channel: a gate row, an up row, a down column)

    @property
    def n_heads(self) -> int:
        return self.n_kv * self.group

    def attn_units(self, unit: str) -> int:
        """Attention units per layer: KV groups or query heads."""
        return self.n_heads if unit == "q_head" else self.n_kv

    @property
    def mlp_units(self) -> int:
        """MLP units per layer: experts, or channels in a dense MLP."""
        return self.experts or self.intermediate

    @property
    def mlp_width(self) -> int:
        """MLP channels per unit: an expert's width, or 1."""
        return self.intermediate // self.experts if self.experts else 1

    @property
    def mlp_unit(self) -> str:
        return "expert" if self.experts else "channel"


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: as in `modeling_pruned_<name>.py` and the pruned `model_type` `darwinfront_<name>`.
        prefix: as in `<prefix>ForCausalLM`, `Pruned<prefix>Config`.
        transformers_module: the family's modeling module in transformers (its rotary and eager attention).
        head_norms: q_norm / k_norm over each head's head_dim inside the attention (Qwen3, Gemma 3).
        projection_norms: q_norm / k_norm over the whole q / k projection (OLMo 2): a unit owns the norm weights of
            its rows, and the norm's statistic runs over the kept rows only (a cut changes the other heads' scale,
            which the masked model reproduces).
        softcap: the attention passes `attn_logit_softcapping` to the attention function (Gemma 2).
        gated: the MLP is down(act(gate(x)) * up(x)); false: down(act(up(x))) (GPT-NeoX), no gate_proj.
    """

    name: str
    prefix: str
    transformers_module: str
    head_norms: bool = False
    projection_norms: bool = False
    softcap: bool = False
    gated: bool = True

    @property
    def architecture(self) -> str:
        return f"{self.prefix}ForCausalLM"

    # --- where the weights live -------------------------------------------------------------------------------
    @staticmethod
    def layers(model: nn.Module) -> list[nn.Module]:
        """The decoder layers of a causal LM of the family."""
        return list(model.model.layers)

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        return layer.self_attn

    @staticmethod
    def mlp(layer: nn.Module) -> nn.Module:
        return layer.mlp

    @staticmethod
    def final_norm(model: nn.Module) -> nn.Module:
        """The norm between the last decoder layer and the LM head."""
        return model.model.norm

    @property
    def mlp_projections(self) -> tuple[str, ...]:
        return MLP_PROJ if self.gated else UNGATED_MLP_PROJ

    def canonical(self, model: nn.Module) -> None:
        """Put `model`'s decoder layers, in place, in the layout this adapter names (a family with fused
        projections splits them here); a model already in it is left as it is. Llama's layout: nothing to do."""

    def shape(self, model: nn.Module) -> Shape:
        """The dense shape of `model`, from its config and its layers' biases."""
        config = model.config
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        layers = self.layers(model)  # biases from the first layer that still has the linear (a sliced model's may not)
        return Shape(
            n_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            n_kv=n_kv,
            group=n_heads // n_kv,
            head_dim=head_dim(config),
            intermediate=config.intermediate_size,
            attn_bias=next((a.k_proj.bias is not None for a in map(self.attention, layers) if hasattr(a, "k_proj")),
                           False),
            mlp_bias=next((m.up_proj.bias is not None for m in map(self.mlp, layers) if hasattr(m, "up_proj")),
                          False),
            attn_extra_params=next((extra_params(a, ATTN_PROJ + (NORMS if self.projection_norms else ()))
                                    for a in map(self.attention, layers) if hasattr(a, "k_proj")), 0),
            projection_norms=self.projection_norms,
            gated=self.gated,
        )

    def check(self, model: nn.Module) -> None:
        """Raise `InvalidSpec` unless `model`'s layers hold the linears this adapter names."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not layers:
            raise InvalidSpec("model.source", f"{self.architecture} has no decoder layers at model.model.layers")
        config = model.config
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if config.num_attention_heads % n_kv:
            raise InvalidSpec("model.source",
                              f"{config.num_attention_heads} query heads do not split into {n_kv} KV groups")
        for i, layer in enumerate(layers):
            for part, module, projections in (("self_attn", self.attention(layer), ATTN_PROJ),
                                              ("mlp", self.mlp(layer), self.mlp_projections)):
                if getattr(module, "darwinfront_empty", False):
                    continue  # a sub-block the slicer removed
                missing = [p for p in projections if not isinstance(getattr(module, p, None), nn.Linear)]
                if missing:
                    raise InvalidSpec("model.source", f"layer {i} {part} lacks linear {', '.join(missing)}")

    # --- the family's own code --------------------------------------------------------------------------------
    def transformers_code(self):
        """The family's modeling module in transformers (`apply_rotary_pos_emb`, `eager_attention_forward`)."""
        return importlib.import_module(self.transformers_module)

    @property
    def module(self) -> str:
        """The exported modeling file's module name."""
        return f"modeling_pruned_{self.name}"

    @property
    def model_type(self) -> str:
        return f"darwinfront_{self.name}"

    @property
    def config_class(self) -> type:
        return getattr(self._pruned_code(), f"Pruned{self.prefix}Config")

    @property
    def causal_lm_class(self) -> type:
        return getattr(self._pruned_code(), f"Pruned{self.prefix}ForCausalLM")

    def auto_map(self) -> dict:
        return {"AutoConfig": f"{self.module}.Pruned{self.prefix}Config",
                "AutoModelForCausalLM": f"{self.module}.Pruned{self.prefix}ForCausalLM"}

    def _pruned_code(self):
        return importlib.import_module(f"workers.pruned_hf.{self.module}")


def extra_params(module: nn.Module, projections: tuple[str, ...]) -> int:
    """Parameters of `module` outside its `projections` (what goes only when the whole sub-layer goes)."""
    return sum(p.numel() for name, p in module.named_parameters() if name.split(".")[0] not in projections)


def head_dim(config) -> int:
    """A config's head dimension: `head_dim` where given (Gemma, Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
