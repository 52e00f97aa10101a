"""The pieces every pruned model family shares: per-layer shapes read from the config, the stand-ins for a removed
attention or MLP, and attention whose query heads read their KV heads through an index.

This file travels inside every exported model directory beside `modeling_pruned_<family>.py` and is loaded by
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`, so it imports only torch and transformers.

A pruned config is its family's dense config (the dense `num_attention_heads`, `num_key_value_heads`,
`intermediate_size`, `head_dim`) plus `layer_shapes`, one entry per decoder layer:

    {"num_attention_heads": 3,       # query heads kept; 0: the layer has no attention
     "num_key_value_heads": 2,       # KV heads kept (0 with no attention)
     "intermediate_size": 96,        # MLP channels kept; 0: the layer has no MLP
     "kv_head_of_query": [0, 0, 1],  # the KV head each query head reads; null: the usual grouping
                                     #   (query head j reads KV head j // (query heads / KV heads))
     "attention_output_bias": true,  # the attention's output carries a bias even if the family's has none
     "mlp_output_bias": false}       #   (pruning's compensation for removed units), and likewise the MLP's

A mixture-of-experts model's config also holds `expert_width`, the channels of one expert; its layer's
`intermediate_size` is then the kept experts' channels (experts kept x expert_width, `MoEMLP`).

And, only on a layer whose attention or MLP is a neural implant (HAP), `attention_implant_rank` /
`mlp_implant_rank`: the sub-block (0 heads / 0 channels) is replaced by a rank-r linear map of its input,
`implant_out(implant_in(x))` with weights (r, hidden) and (hidden, r), 2·hidden·r parameters.

Such a bias is a buffer named `bias` on o_proj / down_proj (`o_bias` / `down_bias` on a removed sub-block's
stand-in), saved with the weights but not counted among the parameters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "kv_head_of_query",
              "attention_output_bias", "mlp_output_bias")
IMPLANT_KEYS = ("attention_implant_rank", "mlp_implant_rank")  # optional: present only on implanted layers


def settle_layer_shapes(config) -> None:
    """Check `config.layer_shapes`; raise ValueError naming the layer and field unless it describes every layer.

    None means the dense widths on every layer (transformers builds a default config to compare against).
    """
    if config.layer_shapes is None:
        config.layer_shapes = [{"num_attention_heads": config.num_attention_heads,
                                "num_key_value_heads": config.num_key_value_heads,
                                "intermediate_size": dense_mlp_width(config), "kv_head_of_query": None,
                                "attention_output_bias": False, "mlp_output_bias": False}
                               for _ in range(config.num_hidden_layers)]
    shapes = config.layer_shapes
    if not isinstance(shapes, list) or len(shapes) != config.num_hidden_layers:
        raise ValueError(f"layer_shapes: expected a list of {config.num_hidden_layers} layers, got {shapes!r}")
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not set(SHAPE_KEYS) <= set(shape) <= set(SHAPE_KEYS + IMPLANT_KEYS):
            raise ValueError(f"layer_shapes[{i}]: expected the keys {SHAPE_KEYS} (and optionally {IMPLANT_KEYS}), "
                             f"got {shape!r}")
        for key, width in zip(IMPLANT_KEYS, ("num_attention_heads", "intermediate_size"), strict=True):
            rank = shape.get(key, 0)
            if not isinstance(rank, int) or rank < 0 or (rank and shape[width]):
                raise ValueError(f"layer_shapes[{i}].{key}: a rank >= 0, and > 0 only where {width} is 0")
        heads, kv_heads, index = shape["num_attention_heads"], shape["num_key_value_heads"], shape["kv_head_of_query"]
        if (heads == 0) != (kv_heads == 0) or heads < 0 or kv_heads < 0 or shape["intermediate_size"] < 0:
            raise ValueError(f"layer_shapes[{i}]: {heads} query heads on {kv_heads} KV heads")
        if index is None and heads % max(kv_heads, 1):
            raise ValueError(f"layer_shapes[{i}]: {heads} query heads do not group evenly on {kv_heads} KV heads; "
                             "give kv_head_of_query")
        if index is not None and (len(index) != heads or any(not 0 <= k < kv_heads for k in index)):
            raise ValueError(f"layer_shapes[{i}].kv_head_of_query: {heads} indices in 0..{kv_heads - 1} expected")


def dense_mlp_width(config) -> int:
    """The dense MLP's channels: `intermediate_size`, or every expert's in a mixture-of-experts config."""
    width = getattr(config, "expert_width", None)
    return width * config.num_experts if width else config.intermediate_size


def layer_config(config, index: int):
    """A copy of the model config with layer `index`'s head counts and MLP width, for the family's own modules."""
    shape = config.layer_shapes[index]
    layer = copy.copy(config)
    layer.num_attention_heads = shape["num_attention_heads"]
    layer.num_key_value_heads = shape["num_key_value_heads"]
    layer.intermediate_size = shape["intermediate_size"]
    layer.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return layer


def cut_layers(model: nn.Module, attention_class: type, mlp_class: type) -> None:
    """Rebuild each decoder layer of `model` (a family's base model, built dense) at its `layer_shapes` widths.

    `from_pretrained` builds models on the meta device, so the dense modules built first cost no memory there.
    """
    config = model.config
    for i, layer in enumerate(model.layers):
        shape = config.layer_shapes[i]
        attn_rank, mlp_rank = shape.get("attention_implant_rank", 0), shape.get("mlp_implant_rank", 0)
        if attn_rank:
            layer.self_attn = ImplantAttention(i, config.hidden_size, attn_rank, layer.self_attn.o_proj.bias)
        elif shape["num_attention_heads"] == 0:
            layer.self_attn = NoAttention(i, config.hidden_size, layer.self_attn.o_proj.bias)
        else:
            layer.self_attn = attention_class(config, i)
        mlp_bias = getattr(getattr(layer.mlp, "down_proj", None), "bias", None)  # (a stock MoE block has none)
        if mlp_rank:
            layer.mlp = ImplantMLP(config.hidden_size, mlp_rank, mlp_bias)
        elif shape["intermediate_size"] == 0:
            layer.mlp = NoMLP(config.hidden_size, mlp_bias)
        else:
            layer.mlp = mlp_class(layer_config(config, i))
        if shape["attention_output_bias"]:
            _give_bias(*((layer.self_attn, "o_bias") if shape["num_attention_heads"] == 0 else
                         (layer.self_attn.o_proj, "bias")), config.hidden_size)
        if shape["mlp_output_bias"]:
            _give_bias(*((layer.mlp, "down_bias") if shape["intermediate_size"] == 0 else
                         (layer.mlp.down_proj, "bias")), config.hidden_size)


def _give_bias(module: nn.Module, name: str, hidden: int) -> None:
    """A zero `name` buffer (filled by the saved weights) where `module` has no bias of its own."""
    if getattr(module, name) is None:
        delattr(module, name)
        module.register_buffer(name, torch.zeros(hidden))


def set_kv_heads(attention: nn.Module, kv_head_of_query: list[int] | None) -> None:
    """Record which KV head each query head of `attention` reads (None: the usual grouping).

    A plain tuple, not a buffer: `from_pretrained` builds on the meta device and would leave a buffer unset.
    """
    attention.kv_head_of_query = None if kv_head_of_query is None else tuple(int(k) for k in kv_head_of_query)
    if kv_head_of_query is not None:
        attention.num_key_value_groups = 1  # keys and values arrive already expanded to the query heads


def attend_with_kv_index(attention, hidden_states, position_embeddings, attention_mask, cache, *, rotary,
                         eager, attention_functions, **kwargs):
    """The family's attention forward, with keys and values expanded to the query heads by `kv_head_of_query`
(None: the usual grouping, which the attention function expands).

    Per-head q/k norms run where the attention has them, over the whole projection before the heads are split
    where it says `projection_norms` (OLMo 2); the caller passes what else its family hands the attention
    function (Gemma 2's `softcap`) in `kwargs`.

    Keys and values are cached once per KV head and expanded just before the attention function runs (eager,
    sdpa, ...), so the cache is no larger than the dense model's.
    """
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    shape = (*input_shape, -1, attention.head_dim)
    query, key = attention.q_proj(hidden_states), attention.k_proj(hidden_states)  # (B, T, heads · h)
    whole = getattr(attention, "projection_norms", False)
    if whole:  # norms over the whole projection (OLMo 2)
        query, key = attention.q_norm(query), attention.k_norm(key)
    query, key = query.view(shape), key.view(shape)  # (B, T, query heads, h), (B, T, KV heads, h)
    if not whole and getattr(attention, "q_norm", None) is not None:  # per-head norms over head_dim (Qwen3, Gemma 3)
        query, key = attention.q_norm(query), attention.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, heads, T, h)
    value = attention.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = rotary(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, attention.layer_idx, kwargs=kwargs)
    if attention.kv_head_of_query is not None:
        index = torch.tensor(attention.kv_head_of_query, dtype=torch.long, device=key.device)
        key, value = key.index_select(1, index), value.index_select(1, index)  # (B, query heads, S, h)
    attend = attention_functions.get_interface(attention.config._attn_implementation, eager)
    window = getattr(attention, "sliding_window", None)
    extra = {"sliding_window": window} if window is not None else {}
    out, weights = attend(
        attention, query, key, value, attention_mask,
        dropout=0.0 if not attention.training else attention.attention_dropout, scaling=attention.scaling,
        **extra, **kwargs,
    )
    return attention.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class NoAttention(nn.Module):
    """Stands in for a self-attention block that keeps no head: returns its output bias (or zeros).

    It still writes a one-wide zero placeholder into the KV cache, so the cache counts this layer's tokens
    (transformers reads the sequence length from the first layer).
    """

    darwinfront_empty = True

    def __init__(self, layer_idx: int, hidden: int, bias: torch.Tensor | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden = hidden
        self.o_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        batch, seq = hidden_states.shape[:2]
        if cache is not None:
            placeholder = hidden_states.new_zeros(batch, 1, seq, 1)  # (B, 1 head, T, width 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        out = hidden_states.new_zeros(batch, seq, self.hidden)  # (B, T, hidden)
        return (out if self.o_bias is None else out + self.o_bias), None


class NoMLP(nn.Module):
    """Stands in for an MLP that keeps no channel: returns its output bias (or zeros)."""

    darwinfront_empty = True

    def __init__(self, hidden: int, bias: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden
        self.down_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.hidden)
        return out if self.down_bias is None else out + self.down_bias


def _implant_linears(module: nn.Module, hidden: int, rank: int, like: torch.Tensor | None) -> None:
    """The two factors of a rank-`rank` map hidden -> hidden, zero until fitted weights are loaded."""
    kwargs = {} if like is None else {"device": like.device, "dtype": like.dtype}
    module.implant_in = nn.Linear(hidden, rank, bias=False, **kwargs)  # weight (r, hidden)
    module.implant_out = nn.Linear(rank, hidden, bias=False, **kwargs)  # weight (hidden, r)
    with torch.no_grad():
        module.implant_in.weight.zero_()
        module.implant_out.weight.zero_()


class ImplantAttention(NoAttention):
    """A HAP neural implant in place of a self-attention block: a rank-r linear map of each token's input,
    `implant_out(implant_in(x))` (plus the output bias, if any). It attends to nothing, so, like `NoAttention`,
    it writes a one-wide placeholder into the KV cache."""

    def __init__(self, layer_idx: int, hidden: int, rank: int, bias: torch.Tensor | None,
                 like: torch.Tensor | None = None):
        super().__init__(layer_idx, hidden, bias)
        self.rank = rank
        _implant_linears(self, hidden, rank, like)

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        empty, _ = super().forward(hidden_states, *args, cache=cache, **kwargs)  # the bias, the cache placeholder
        return empty + self.implant_out(self.implant_in(hidden_states)), None


class ImplantMLP(NoMLP):
    """A HAP neural implant in place of an MLP: a rank-r linear map `implant_out(implant_in(x))` (+ the bias)."""

    def __init__(self, hidden: int, rank: int, bias: torch.Tensor | None, like: torch.Tensor | None = None):
        super().__init__(hidden, bias)
        self.rank = rank
        _implant_linears(self, hidden, rank, like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.implant_out(self.implant_in(x))


class MoEMLP(nn.Module):
    """A mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE) with its experts laid out as one wide gated MLP:
    expert e owns rows [e·w, (e+1)·w) of `gate_proj` and `up_proj` and the same columns of `down_proj` (w the
    expert's width), and row e of `router`. So an expert is a block of MLP channels, as a KV group is a block of
    query heads, and a cut expert loses its block and its router row.

    Each token goes to the `top_k` experts of highest router probability (softmax over the experts the layer
    keeps; `top_k` capped at that number), weighted by their probabilities, renormalised over the chosen ones
    where `normalize` says so. `expert_mask` (0 kept, -inf removed; None: all) removes experts without slicing
    them: a removed expert is one the router never picks.

    Only the chosen experts run, each on its tokens. While a hook watches `gate_proj`, `up_proj` or `down_proj`,
    the layer runs them as the linears they are instead (every expert on every token, the inputs of experts a
    token does not reach multiplied by zero weight), so a hook sees the linear's whole input; both ways compute
    the same output.
    """

    def __init__(self, hidden: int, experts: int, width: int, top_k: int, normalize: bool, act: str,
                 bias: bool = False):
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts, self.expert_width, self.top_k, self.normalize = experts, width, top_k, normalize
        self.hidden_act = act
        self.act_fn = ACT2FN[act]
        self.router = nn.Linear(hidden, experts, bias=False)
        self.gate_proj = nn.Linear(hidden, experts * width, bias=bias)
        self.up_proj = nn.Linear(hidden, experts * width, bias=bias)
        self.down_proj = nn.Linear(experts * width, hidden, bias=False)
        self.expert_mask: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config, normalize: bool) -> MoEMLP:
        """The MLP of a pruned MoE layer's config (`layer_config`): `intermediate_size / expert_width` experts."""
        experts, rest = divmod(config.intermediate_size, config.expert_width)
        if rest or not experts:
            raise ValueError(f"intermediate_size {config.intermediate_size} is not a whole number of experts of "
                             f"{config.expert_width} channels")
        return cls(config.hidden_size, experts, config.expert_width, config.num_experts_per_tok, normalize,
                   config.hidden_act)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's chosen experts and their weights, (tokens, k) each, for tokens `x` (tokens, hidden)."""
        logits = self.router(x).float()  # (tokens, experts)
        if self.expert_mask is not None:
            logits = logits + self.expert_mask
        probs = torch.softmax(logits, dim=-1)
        weights, chosen = torch.topk(probs, min(self.top_k, self.num_experts), dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights.to(x.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (tokens, hidden)
        chosen, weights = self.route(x)
        watched = any(m._forward_hooks or m._forward_pre_hooks for m in (self.gate_proj, self.up_proj, self.down_proj))
        if watched:  # (the hooks see the linears' inputs in the layer's own shape, (B, T, ...))
            return self._as_linears(hidden_states, chosen.reshape(*shape[:-1], -1), weights.reshape(*shape[:-1], -1))
        return self._by_expert(x, chosen, weights).reshape(shape)

    def _by_expert(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        w = self.expert_width
        for e in torch.unique(chosen).tolist():
            token, slot = torch.where(chosen == e)
            rows = slice(e * w, (e + 1) * w)
            h = x[token]
            gate = nn.functional.linear(h, self.gate_proj.weight[rows], _rows(self.gate_proj.bias, rows))
            up = nn.functional.linear(h, self.up_proj.weight[rows], _rows(self.up_proj.bias, rows))
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj.weight[:, rows])
            out.index_add_(0, token, y * weights[token, slot, None])
        return out if self.down_proj.bias is None else out + self.down_proj.bias

    def _as_linears(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        spread = x.new_zeros(*x.shape[:-1], self.num_experts)  # (..., experts): each expert's weight per token
        spread.scatter_add_(-1, chosen, weights)
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (..., experts · width)
        return self.down_proj(h * spread.repeat_interleave(self.expert_width, dim=-1))


def _rows(bias: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if bias is None else bias[rows]
