"""A numpy forward of a GGUF file as llama.cpp's `deci` graph computes it (src/models/deci.cpp), for tests that
check an exported file's layout without llama.cpp: per-layer head counts from the metadata, a layer with
`head_count` 0 passing its input on, one with `feed_forward_length` 0 skipped whole, interleaved rotary pairs,
query heads grouped evenly on KV heads."""

from __future__ import annotations

import gguf
import numpy as np


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """The metadata (`key -> value`, arrays as lists) and the tensors as float32 (rows, columns) arrays."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists the fastest dimension first
        tensors[t.name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
    return fields, tensors


def forward(path, ids: list[int]) -> np.ndarray:
    """The logits (T, vocab) of token ids `ids` under GGUF file `path`."""
    meta, w = read(path)
    per_layer = [meta[f"deci.{k}"] for k in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")]
    eps, base = meta["deci.attention.layer_norm_rms_epsilon"], meta["deci.rope.freq_base"]
    dim = meta["deci.attention.key_length"]
    x = w["token_embd.weight"][ids]  # (T, hidden)
    for i, (heads, kv_heads, ffn) in enumerate(zip(*per_layer, strict=True)):
        inp = x
        cur = x if heads == 0 else _norm(x, w[f"blk.{i}.attn_norm.weight"], eps)
        if heads > 0:
            cur = _attention(cur, w, i, heads, kv_heads, dim, base, w.get("rope_freqs.weight"))
        if ffn == 0:
            continue  # deci skips the whole layer
        ffn_inp = cur + inp if heads > 0 else cur
        h = _norm(ffn_inp, w[f"blk.{i}.ffn_norm.weight"], eps)
        gate, up = _linear(h, w, f"blk.{i}.ffn_gate"), _linear(h, w, f"blk.{i}.ffn_up")
        x = _linear(gate / (1.0 + np.exp(-gate)) * up, w, f"blk.{i}.ffn_down") + ffn_inp
    x = _norm(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def _attention(x, w, i, heads, kv_heads, dim, base, factors):
    steps = x.shape[0]
    q = _rope(_linear(x, w, f"blk.{i}.attn_q").reshape(steps, heads, dim), base, factors)  # (T, H, d)
    k = _rope(_linear(x, w, f"blk.{i}.attn_k").reshape(steps, kv_heads, dim), base, factors)  # (T, KV, d)
    v = _linear(x, w, f"blk.{i}.attn_v").reshape(steps, kv_heads, dim)
    group = heads // kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (T, H, d)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dim)  # (H, T, T)
    scores = scores + np.triu(np.full((steps, steps), -np.inf), 1)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(steps, heads * dim)
    return _linear(out, w, f"blk.{i}.attn_output")


def _rope(x, base, factors=None):
    """Rotate adjacent pairs (2j, 2j+1) by position * base^(-2j/d) / factor_j (llama.cpp's normal rotary)."""
    steps, _, dim = x.shape
    frequencies = base ** (-np.arange(0, dim, 2) / dim) / (1.0 if factors is None else factors)  # (d/2,)
    angles = np.arange(steps)[:, None] * frequencies[None, :]  # (T, d/2)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out


def _linear(x, w, name):
    out = x @ w[f"{name}.weight"].T
    return out + w[f"{name}.bias"] if f"{name}.bias" in w else out


def _norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight
