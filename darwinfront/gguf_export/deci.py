"""A model directory's decoder as llama.cpp's `deci` architecture: per-layer widths and the tensors that carry them.

`deci` (DeciLM / Nemotron-NAS in llama.cpp) reads `head_count`, `head_count_kv` and `feed_forward_length` as
per-layer arrays and runs a layer with no attention (`head_count` 0) by passing its input on. Three of its rules
shape what we write, each kept exact:

- a layer with no attention but an output bias (pruning's compensation), and layer 0 without attention (llama.cpp
  reads the head size only when layer 0 has heads), get one all-zero head instead: its output is its bias alone;
- a layer with no MLP gets an all-zero MLP `DUMMY_FFN` channels wide (plus its bias), because `deci` skips a
  layer whose `feed_forward_length` is 0 whole, attention included; only a layer that has neither keeps 0;
- query heads that read their KV heads unevenly (`kv_head_of_query`) get one KV head each, copied, since
  llama.cpp groups query heads on KV heads evenly.

Query and key rows are permuted as llama.cpp's Llama converter does (its rotary pairs are adjacent, Hugging Face's
are half a head apart); `deci` uses that rotary for every family we export, Qwen2, Mistral and Phi-3 included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from darwinfront.gguf_export.weights import Weights

DUMMY_FFN = 32  # one Q8_0 block: the all-zero MLP that stands in for a removed one
FAMILIES = {"llama", "mistral", "qwen2", "phi3"}  # config model types (and darwinfront_<family>) we export; a pruned
# Phi-3 stores its q/k/v and gate/up apart (workers.pruned_hf.modeling_pruned_phi3), under Llama's names


@dataclass(frozen=True)
class Geometry:
    """The dense sizes of a model directory's `config.json`."""

    layers: int
    hidden: int
    head_dim: int
    context: int
    rope_theta: float
    rms_eps: float
    tied: bool
    rope_factors: tuple[float, ...] | None = None  # llama3 scaling: each rotary frequency divided by its factor


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer is written as (`heads` 0: no attention; `ffn` 0: no MLP)."""

    heads: int
    kv_heads: int
    ffn: int
    kv_rows: tuple[int, ...] | None  # the stored KV head each written KV head copies; None: as stored
    zero_attention: bool  # the written head is an all-zero stand-in
    zero_mlp: bool


@dataclass(frozen=True)
class Tensor:
    """One GGUF tensor: its name, its (rows, columns) or (n,) shape, and how to make its float32 data."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def geometry(config: dict) -> Geometry:
    """The dense sizes; `ValueError` naming the setting for a model `deci` cannot run as it is."""
    family = str(config.get("model_type", "")).removeprefix("darwinfront_")
    if family not in FAMILIES:
        raise ValueError(f"model_type {config.get('model_type')!r}: the GGUF export writes "
                         f"{', '.join(sorted(FAMILIES))} models")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r}: llama.cpp's deci runs SiLU MLPs only")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3", None):
        raise ValueError(f"rope_type {kind!r}: the GGUF export writes unscaled or llama3-scaled rotary embeddings")
    partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial}: the GGUF export writes rotary embeddings over the whole "
                         "head only")
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return Geometry(
        layers=config["num_hidden_layers"], hidden=config["hidden_size"], head_dim=head_dim,
        context=config.get("max_position_embeddings", 2048), rope_theta=theta,
        rms_eps=float(config.get("rms_norm_eps", 1e-6)), tied=bool(config.get("tie_word_embeddings", False)),
        rope_factors=llama3_rope_factors(rope, theta, head_dim) if kind == "llama3" else None,
    )


def llama3_rope_factors(rope: dict, theta: float, head_dim: int) -> tuple[float, ...]:
    """Llama 3's frequency scaling as per-frequency divisors (llama.cpp's `rope_freqs`): high frequencies kept, low
    ones divided by `factor`, a smooth blend between the two wavelengths."""
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    original = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for j in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (j / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(float(factor))
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


def layer_plans(config: dict, weights: Weights) -> list[LayerPlan]:
    """Each layer's written widths, from `layer_shapes` (a pruned directory) or the dense sizes."""
    dense = {"num_attention_heads": config["num_attention_heads"],
             "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
             "intermediate_size": config["intermediate_size"], "kv_head_of_query": None}
    shapes = config.get("layer_shapes") or [dense] * config["num_hidden_layers"]
    last = len(shapes) - 1
    plans = []
    for i, shape in enumerate(shapes):
        heads, kv_heads, ffn = (shape["num_attention_heads"], shape["num_key_value_heads"],
                                shape["intermediate_size"])
        index = shape.get("kv_head_of_query")
        kv_rows = None if index is None else tuple(index)
        zero_attention = heads == 0 and (i == 0 or f"model.layers.{i}.self_attn.o_bias" in weights)
        if zero_attention:
            heads, kv_heads = 1, 1
        elif kv_rows is not None:
            kv_heads = heads
        zero_mlp = ffn == 0 and (heads > 0 or i == last or f"model.layers.{i}.mlp.down_bias" in weights)
        plans.append(LayerPlan(heads, kv_heads, DUMMY_FFN if zero_mlp else ffn, kv_rows, zero_attention, zero_mlp))
    return plans


def permute_rotary(array: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q or k (or their bias) from Hugging Face's half-split rotary order to llama.cpp's interleaved one."""
    rows = array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:])  # (heads, 2, dim/2, ...)
    return rows.swapaxes(1, 2).reshape(array.shape)


def tensors(geo: Geometry, plans: list[LayerPlan], weights: Weights) -> list[Tensor]:
    """Every tensor of the GGUF file, in llama.cpp's names (an output.weight only when the embedding is untied)."""
    embedding = "model.embed_tokens.weight"
    out = [Tensor("token_embd.weight", weights.shape(embedding), lambda: weights.get(embedding))]
    if geo.rope_factors is not None:
        factors = np.asarray(geo.rope_factors, np.float32)
        out.append(Tensor("rope_freqs.weight", factors.shape, lambda: factors))
    for i, plan in enumerate(plans):
        out += _attention(i, plan, geo, weights) + _mlp(i, plan, geo, weights)
    out.append(Tensor("output_norm.weight", (geo.hidden,), lambda: weights.get("model.norm.weight")))
    if "lm_head.weight" in weights and not geo.tied:
        out.append(Tensor("output.weight", weights.shape("lm_head.weight"), lambda: weights.get("lm_head.weight")))
    elif not geo.tied:
        raise ValueError("tie_word_embeddings is false but the weights hold no lm_head.weight")
    return out


def _attention(i: int, plan: LayerPlan, geo: Geometry, weights: Weights) -> list[Tensor]:
    if plan.heads == 0:
        return []
    src, dst = f"model.layers.{i}.", f"blk.{i}."
    q_rows, kv_rows = plan.heads * geo.head_dim, plan.kv_heads * geo.head_dim
    if plan.zero_attention:
        out = [Tensor(dst + "attn_norm.weight", (geo.hidden,), lambda: np.ones(geo.hidden, np.float32))]
        for name, shape in (("attn_q", (q_rows, geo.hidden)), ("attn_k", (kv_rows, geo.hidden)),
                            ("attn_v", (kv_rows, geo.hidden)), ("attn_output", (geo.hidden, q_rows))):
            out.append(Tensor(f"{dst}{name}.weight", shape, lambda shape=shape: np.zeros(shape, np.float32)))
        bias = src + "self_attn.o_bias"
        if bias in weights:
            out.append(Tensor(dst + "attn_output.bias", (geo.hidden,), lambda: weights.get(bias)))
        return out

    def project(name: str, heads: int, *, rotary: bool, gather: bool, suffix: str) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            array = weights.get(f"{src}self_attn.{name}.{suffix}")  # (stored heads * head_dim[, hidden])
            if gather and plan.kv_rows is not None:
                array = array.reshape(-1, geo.head_dim, *array.shape[1:])[list(plan.kv_rows)]
                array = array.reshape(-1, *array.shape[2:])
            return permute_rotary(array, heads) if rotary else array
        return make

    out = [Tensor(dst + "attn_norm.weight", (geo.hidden,), lambda: weights.get(src + "input_layernorm.weight"))]
    for name, gguf_name, heads, rotary in (("q_proj", "attn_q", plan.heads, True), ("k_proj", "attn_k", plan.kv_heads,
                                           True), ("v_proj", "attn_v", plan.kv_heads, False)):
        rows = heads * geo.head_dim
        gather = name != "q_proj"
        out.append(Tensor(f"{dst}{gguf_name}.weight", (rows, geo.hidden),
                          project(name, heads, rotary=rotary, gather=gather, suffix="weight")))
        if f"{src}self_attn.{name}.bias" in weights:
            out.append(Tensor(f"{dst}{gguf_name}.bias", (rows,),
                              project(name, heads, rotary=rotary, gather=gather, suffix="bias")))
    out.append(Tensor(dst + "attn_output.weight", (geo.hidden, q_rows),
                      lambda: weights.get(src + "self_attn.o_proj.weight")))
    if src + "self_attn.o_proj.bias" in weights:
        out.append(Tensor(dst + "attn_output.bias", (geo.hidden,), lambda: weights.get(src + "self_attn.o_proj.bias")))
    return out


def _mlp(i: int, plan: LayerPlan, geo: Geometry, weights: Weights) -> list[Tensor]:
    if plan.ffn == 0:
        return []
    src, dst = f"model.layers.{i}.", f"blk.{i}."
    shapes = {"ffn_gate": (plan.ffn, geo.hidden), "ffn_up": (plan.ffn, geo.hidden), "ffn_down": (geo.hidden, plan.ffn)}
    if plan.zero_mlp:
        out = [Tensor(dst + "ffn_norm.weight", (geo.hidden,), lambda: np.ones(geo.hidden, np.float32))]
        out += [Tensor(f"{dst}{name}.weight", shape, lambda shape=shape: np.zeros(shape, np.float32))
                for name, shape in shapes.items()]
        if src + "mlp.down_bias" in weights:
            out.append(Tensor(dst + "ffn_down.bias", (geo.hidden,), lambda: weights.get(src + "mlp.down_bias")))
        return out
    norm = src + "post_attention_layernorm.weight"
    out = [Tensor(dst + "ffn_norm.weight", (geo.hidden,), lambda: weights.get(norm))]
    for name, hf in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
        stored = f"{src}mlp.{hf}."
        out.append(Tensor(f"{dst}{name}.weight", shapes[name], lambda stored=stored: weights.get(stored + "weight")))
        if stored + "bias" in weights:
            rows = shapes[name][0]
            out.append(Tensor(f"{dst}{name}.bias", (rows,), lambda stored=stored: weights.get(stored + "bias")))
    return out

