"""Bytes and decode speed of the packed mixed-precision KV cache against an fp16 DynamicCache.

Two model shapes: the builtin tiny-llama (hidden 128, 4 layers, 8 heads, 4 KV heads: head_dim 16) and the same
depth with head_dim 128 (random init), since per-group metadata weighs 32 / group bits per element and a group
never leaves its head. Figures are ratios measured in one run; nothing is asserted.

    .venv/bin/python benchmarks/kv_memory.py [--tokens 2048] [--decode 16] [--rounds 3] [--random-init]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from workers.kv.cache import KVPrecisionConfig, build_cache, kv_bits, model_shape

MIXED_325 = ((4, 4), (4, 2), (2, 2), (4, 4))  # (8 + 6 + 4 + 8) / 8 = 3.25 bits, keys first as KVTuner finds
CONFIGS = {
    "KV4 per-token": KVPrecisionConfig.uniform(4, 4, 4),
    "KV4 kivi": KVPrecisionConfig.uniform(4, 4, 4, mode="kivi"),
    "C3.25 kivi": KVPrecisionConfig(layers=MIXED_325, mode="kivi"),
    "C3.25 per-token": KVPrecisionConfig(layers=MIXED_325),
}


def tiny_llama(random_init: bool, dtype: torch.dtype) -> tuple[LlamaForCausalLM, object, str]:
    """The builtin tiny-llama (trained on first use) and its tokenizer, or a random-init model of its shape."""
    if not random_init:
        try:
            from workers.modeling import load_model

            model, tokenizer = load_model("builtin:tiny-llama", dtype=dtype, device="cpu")
            return model, tokenizer, "builtin:tiny-llama"
        except Exception as exc:  # the benchmark still measures bytes and speed on the shape alone
            print(f"builtin:tiny-llama unavailable ({exc!r}); using a random-init model of its shape")
    return random_llama(hidden=128, heads=8, dtype=dtype), None, "tiny-llama shape, random init"


@torch.no_grad()
def quality(model, tokenizer) -> None:
    """Teacher-forced KL(fp || quantized) per token and top-1 agreement on held-out pydoc text, with the
    current forward seeing its own K/V quantized; then the profile's Pareto candidates and groups."""
    from search.kv_space import build_space, pair_name
    from workers.data import load_texts, token_sequences
    from workers.kv.profile import profile_kv

    texts = load_texts("builtin:pydoc")
    ids = token_sequences(tokenizer, texts, n_tokens=1024, seq_len=256, split="evaluation", seed=0)  # (4, 256)
    ref = model(ids).logits.float().log_softmax(-1)  # (4, 256, vocab)
    configs = {**CONFIGS, "KV2 per-token": KVPrecisionConfig.uniform(2, 2, 4)}
    print(f"\nquality on {ids.numel()} held-out tokens (quantized in the forward)")
    print(f"{'cache':<20}{'nominal':>8}{'KL/token':>10}{'top-1 agree':>13}")
    for name, config in configs.items():
        cache = build_cache(model, config, "simulated", quantize_in_forward=True)
        out = model(ids, past_key_values=cache).logits.float().log_softmax(-1)
        kl = float((ref.exp() * (ref - out)).sum(-1).mean())
        agree = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
        print(f"{name:<20}{kv_bits(config)['nominal']:>8.2f}{kl:>10.4f}{agree:>13.3f}")
    calib = token_sequences(tokenizer, texts, n_tokens=1024, seq_len=128, split="calibration", seed=0)
    space = build_space(profile_kv(model, calib.to(model.device)))
    print("\nper-token profile -> Pareto candidates -> groups (eps 0.05)")
    for g in space.groups:
        print(f"  layers {list(g.layers)}: {' '.join(pair_name(p) for p in g.candidates)}")


def random_llama(*, hidden: int, heads: int, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).to(dtype).eval()


def filled(model, config: KVPrecisionConfig, base: DynamicCache, storage: str = "packed"):
    """Our cache holding what ``base`` holds after a prefill (a cache's state does not depend on what its
    ``update`` returns, so one model prefill serves every config)."""
    cache = build_cache(model, config, storage)
    for i, layer in enumerate(base.layers):
        cache.update(layer.keys, layer.values, i)
    return cache


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_speeds(model, caches: dict, first: torch.Tensor, *, steps: int, rounds: int) -> dict[str, float]:
    """Greedy decode tokens/s per cache: the best of ``rounds`` rounds of ``steps`` tokens, the caches taking
    turns so that a busy spell on a shared machine spreads over all of them."""
    tokens = {name: model(first, past_key_values=c).logits[:, -1:].argmax(-1) for name, c in caches.items()}
    best = dict.fromkeys(caches, 0.0)  # the untimed step above warmed each path up
    for _ in range(rounds):
        for name, cache in caches.items():
            start = time.perf_counter()
            for _ in range(steps):
                tokens[name] = model(tokens[name], past_key_values=cache).logits[:, -1:].argmax(-1)  # (B, 1)
            best[name] = max(best[name], steps * first.shape[0] / (time.perf_counter() - start))
    return best


@torch.no_grad()
def run_shape(label: str, model, *, tokens: int, steps: int, rounds: int) -> None:
    _, kv_heads, head_dim = model_shape(model)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    base = DynamicCache(config=model.config)
    first = model(ids, past_key_values=base).logits[:, -1:].argmax(-1)  # (1, 1)
    caches = {name: filled(model, config, base) for name, config in CONFIGS.items()}
    caches["KV4 simulated"] = filled(model, CONFIGS["KV4 per-token"], base, "simulated")
    held = {name: cache_bytes(c) for name, c in caches.items()}
    base_bytes = cache_bytes(base)
    caches = {"fp16 DynamicCache": base, **caches}
    speed = decode_speeds(model, caches, first, steps=steps, rounds=rounds)
    print(f"\n{label}: head_dim {head_dim}, {kv_heads} KV heads, {tokens} tokens, {model.dtype}")
    print(f"{'cache':<20}{'bytes':>12}{'x fp16':>8}{'bits/elem':>11}{'kv_bits eff':>13}{'tok/s':>8}{'x fp16':>8}")
    for name in caches:
        nbytes = held.get(name, base_bytes)
        bits = kv_bits(CONFIGS[name], seq_len=tokens, head_dim=head_dim)["effective"] if name in CONFIGS else None
        print(f"{name:<20}{nbytes:>12,}{nbytes / base_bytes:>8.3f}{16 * nbytes / base_bytes:>11.2f}"
              f"{'' if bits is None else f'{bits:.2f}':>13}{speed[name]:>8.1f}"
              f"{speed[name] / speed['fp16 DynamicCache']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=16, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best one counts")
    parser.add_argument("--random-init", action="store_true", help="skip building the trained tiny-llama")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    model, tokenizer, label = tiny_llama(args.random_init, torch.float16)
    run_shape(label, model, tokens=args.tokens, steps=args.decode, rounds=args.rounds)
    if tokenizer is not None:
        quality(model.float(), tokenizer)
    run_shape("head_dim-128 shape, random init", random_llama(hidden=1024, heads=8, dtype=torch.float16),
              tokens=args.tokens, steps=args.decode, rounds=args.rounds)


if __name__ == "__main__":
    main()
