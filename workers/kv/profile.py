"""Per-layer sensitivity of attention to K/V precision pairs (KVTuner's offline profile).

A forward on calibration sequences captures every layer's real q, k, v (after rotary embedding, before the GQA
repeat) through a registered attention function. For each layer and each (k_bits, v_bits) pair, the captured K
and V are quantized offline (no residual window: every token is quantized, so the figure is the quantizer's
own error) and the causal attention output is recomputed, with the layer's own sliding window and
attention-logit soft-cap where it has them (Gemma 2):

    o = softmax(cap(q K^T * scaling) + causal) V,    o_hat the same with K_hat, V_hat

    e_o = mean over (sequence, head, query token) of ||o - o_hat|| / ||o||   (norms over head_dim)
    e_k = mean over (sequence, kv head, token) of ||K - K_hat|| / ||K||, e_v likewise.

(KVTuner's notation leaves element-wise and norm ratios ambiguous; the norm ratio does not blow up on
near-zero elements.) Errors are computed inside the forward, so memory stays at one layer's tensors.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from workers.kv.cache import KVPrecisionConfig, model_shape
from workers.kv.quant import fake_quantize

PROFILE_BITS = (2, 4, 8)
_CAPTURE = "darwinfront_kv_capture"
_EPS = 1e-12


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, *,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention in fp32: q (B, Hq, T, D), k/v (B, Hkv, S, D), Hq a multiple of Hkv -> (B, Hq, T, D).

    The T queries are the last T of the S positions; kv head h serves query heads h*r .. h*r + r - 1. With a
    `window`, a query sees its own position and the `window - 1` before it (transformers' sliding window);
    `softcap` caps the scores as `softcap * tanh(scores / softcap)` before the mask.
    """
    rep = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(rep, dim=1)  # (B, Hq, S, D)
    v = v.float().repeat_interleave(rep, dim=1)
    T, S = q.shape[-2], k.shape[-2]
    scores = (q.float() @ k.transpose(-1, -2)) * scaling  # (B, Hq, T, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if window is not None:
        visible &= ~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(dim=-1) @ v


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over all rows of ||x - x_hat|| / ||x|| with norms over the last dim."""
    x, x_hat = x.float(), x_hat.float()
    return ((x - x_hat).norm(dim=-1) / x.norm(dim=-1).clamp_min(_EPS)).mean()


def pair_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_bits: int, v_bits: int, *,
                config: KVPrecisionConfig, scaling: float, window: int | None = None,
                softcap: float | None = None) -> dict[str, float]:
    """e_o, e_k, e_v of one layer's captured q, k, v under (k_bits, v_bits) and ``config``'s grouping (the
    layer's sliding `window` and `softcap`, if any, as in `attention_output`)."""
    head_dim = k.shape[-1]
    if config.mode == "kivi":
        k_hat = fake_quantize(k, k_bits, axis="channel", group=config.group_size)
    else:
        k_hat = fake_quantize(k, k_bits, axis="token", group=config.token_group(head_dim))
    v_hat = fake_quantize(v, v_bits, axis="token", group=config.token_group(head_dim))
    o = attention_output(q, k, v, scaling, window=window, softcap=softcap)
    o_hat = attention_output(q, k_hat, v_hat, scaling, window=window, softcap=softcap)
    return {"e_o": float(relative_error(o, o_hat)), "e_k": float(relative_error(k, k_hat)),
            "e_v": float(relative_error(v, v_hat))}


@contextmanager
def capture_attention(model, on_attention: Callable) -> Iterator[None]:
    """Within the block, every attention call of ``model`` first calls
    ``on_attention(layer_idx, query, key, value, scaling, window, softcap)`` (the layer's sliding window and
    logit soft-cap, None where it has none) and then runs as the model's own attention implementation did.

    Not thread-safe: it switches the model's attention implementation for the duration of the block.
    """
    before = model.config._attn_implementation
    mask = "eager" if before == "eager" else "sdpa"

    def capture(module, query, key, value, attention_mask, **kwargs):
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        on_attention(module.layer_idx, query, key, value, scaling, kwargs.get("sliding_window"),
                     kwargs.get("softcap"))
        return _implementation(module, before)(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    AttentionMaskInterface.register(_CAPTURE, ALL_MASK_ATTENTION_FUNCTIONS[mask])
    model.set_attn_implementation(_CAPTURE)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _implementation(module, name: str) -> Callable:
    """The attention function `name` names for `module`: a registered one, or eager as the module's family
    defines it (transformers keeps one `eager_attention_forward` per modeling file)."""
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    code = importlib.import_module(type(module).__module__)
    return getattr(code, "eager_attention_forward", None) or ALL_ATTENTION_FUNCTIONS["sdpa"]


@torch.no_grad()
def profile_kv(model, calibration: torch.Tensor, *, mode: str = "per_token", group_size: int | None = None,
               bits: tuple[int, ...] = PROFILE_BITS, batch_size: int = 4) -> dict:
    """Profile every layer under every (k_bits, v_bits) pair from ``bits`` squared.

    Args:
        model: a causal LM (sliding-window layers are profiled under their window).
        calibration: token ids (N, T), N sequences of equal length (no padding).
        mode, group_size: the quantization mode and grouping, as in ``KVPrecisionConfig``.
        bits: bit-widths to pair (16 = untouched is allowed).
        batch_size: sequences per forward.

    Returns:
        JSON-safe ``{"mode", "group_size", "num_layers", "sequences", "tokens",
        "layers": [{"layer": l, "pairs": [{"k", "v", "bits", "e_o", "e_k", "e_v"}, ...]}, ...]}``;
        errors are averaged over the sequences, pairs ordered high to low bits.
    """
    num_layers, _, _ = model_shape(model)
    config = KVPrecisionConfig.uniform(16, 16, num_layers, mode=mode, group_size=group_size)
    pairs = sorted(itertools.product(bits, bits), key=lambda p: (-(p[0] + p[1]), -p[0]))
    sums = [{p: {"e_o": 0.0, "e_k": 0.0, "e_v": 0.0} for p in pairs} for _ in range(num_layers)]

    def on_attention(layer_idx, query, key, value, scaling, window, softcap):
        n = query.shape[0]
        config.check_model(num_layers, key.shape[-1])
        for p in pairs:
            errs = pair_errors(query, key, value, *p, config=config, scaling=scaling, window=window,
                               softcap=softcap)
            for name, e in errs.items():
                sums[layer_idx][p][name] += e * n

    model.eval()
    with capture_attention(model, on_attention):
        for start in range(0, calibration.shape[0], batch_size):
            batch = calibration[start:start + batch_size].to(model.device)
            model(input_ids=batch, use_cache=False)
    n_seq = calibration.shape[0]
    layers = [
        {"layer": layer, "pairs": [
            {"k": k, "v": v, "bits": (k + v) / 2, **{m: s / n_seq for m, s in sums[layer][(k, v)].items()}}
            for k, v in pairs
        ]}
        for layer in range(num_layers)
    ]
    return {"mode": config.mode, "group_size": config.group_size, "num_layers": num_layers,
            "sequences": n_seq, "tokens": int(calibration.numel()), "layers": layers}
