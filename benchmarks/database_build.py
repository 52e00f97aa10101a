"""Time the obs level database build on a model of SmolLM2-135M's shape: statistics, OBS per layer, peak memory.

The model is `builtin:smollm2-135m` (the real SmolLM2-135M-Instruct) or, with `--model random`, a random-init
Llama of the same shape: 30 layers, hidden 576, 9 query / 3 KV heads of 64, MLP 1536, vocab 49,152 (OBS costs
depend on the shapes, not on the weights).
Calibration: 8,192 pydoc tokens in sequences of 128 (random ids without the real tokenizer); the level table is
`workers.levels.table_for` for 10 levels with MLP multiple 8, as a job's defaults give.

Reported: `database.build` into a temporary directory (layer-by-layer statistics, OBS, safetensors writes), split
into statistics gathering (the build less its `obs_prune` calls and writes), OBS seconds per layer and kind (timed
around every `obs_prune` call), and writes; peak RSS while building; the Hessian memory per layer against the
one-pass gathering it replaced. Then, side by side on one layer's Hessians, the eager greedy loop that
`obs_prune` replaced (the known-answer tests' `_reference_obs_prune`, so both check the same copy) against
`obs_prune`: seconds, the old/new ratio, and whether the removal orders and weights agree.

    .venv/bin/python benchmarks/database_build.py --threads 2
    .venv/bin/python benchmarks/database_build.py --threads 1 --model random
    .venv/bin/python benchmarks/database_build.py --device cuda --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from torch import nn

from workers import data, database, levels
from workers.criteria import obs
from workers.criteria._common import KINDS, layerwise_stats, target_linear

SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True,
)


def load_model(which: str, device: str, dtype: str) -> tuple[nn.Module, object | None, str]:
    """(model, tokenizer or None, what it is): `builtin:smollm2-135m` (the real GGUF, dequantized once into the
    cache) or any model source, or `random` (a random-init Llama of SmolLM2-135M's shape)."""
    if which != "random":
        from workers.modeling import load_model as load

        model, tokenizer = load(which, device=device, dtype=dtype)
        return model, tokenizer, f"{which} ({dtype} on {device})"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval().to(device=device, dtype=getattr(torch, dtype))
    return model, None, f"random-init Llama of SmolLM2-135M's shape ({dtype} on {device})"


def calibration_tokens(tokenizer, vocab: int, n_tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """(N, T) pydoc calibration tokens with the real tokenizer, else random ids."""
    if tokenizer is not None:
        texts = data.load_texts("builtin:pydoc")
        return data.token_sequences(tokenizer, texts, n_tokens=n_tokens, seq_len=seq_len, split="calibration",
                                    seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (-(-n_tokens // seq_len), seq_len), generator=gen)


@contextmanager
def peak_rss(period: float = 0.02) -> Iterator[list[int]]:
    """Sample this process's resident set every `period` seconds; the list holds the peak in bytes."""
    proc, stop = psutil.Process(), threading.Event()
    peak = [proc.memory_info().rss]

    def watch() -> None:
        while not stop.wait(period):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)


@contextmanager
def timing_obs() -> Iterator[dict[str, list]]:
    """Time every `obs_prune` call and every level-weight write the database build makes (wrapped in place)."""
    log: dict[str, list] = {"prune": [], "writes": []}
    real_prune, real_save = obs.obs_prune, database.save_file

    def timed(real: Callable, key: str) -> Callable:
        def run(*args, **kwargs):
            started = time.perf_counter()
            out = real(*args, **kwargs)
            log[key].append((args[2] if key == "prune" else None, time.perf_counter() - started))
            return out

        return run

    obs.obs_prune, database.save_file = timed(real_prune, "prune"), timed(real_save, "writes")
    try:
        yield log
    finally:
        obs.obs_prune, database.save_file = real_prune, real_save


def eager_reference() -> Callable:
    """The eager greedy loop `obs_prune` replaced, from the known-answer tests (one copy of it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    threads = torch.get_num_threads()
    from test_criteria_obs import _reference_obs_prune  # its support module pins torch to one thread

    torch.set_num_threads(threads)
    return _reference_obs_prune


def build(model, calib, table, batch_size: int) -> dict:
    """Build the obs database once into a temporary directory; seconds per part and the peak RSS."""
    before = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as root, timing_obs() as log, peak_rss() as peak:
        started = time.perf_counter()
        db = database.build(model, calib, criterion="obs", table=table, root=Path(root),
                            options={"batch_size": batch_size})
        total = time.perf_counter() - started
        assert db.built and db.n_layers == model.config.num_hidden_layers
    groups = [g for g, _ in log["prune"]]
    attn_group = max(groups)  # o_proj prunes in attention-unit blocks, down_proj channel by channel
    per_kind = {kind: [s for g, s in log["prune"] if (g == attn_group) == (kind == "attn")] for kind in KINDS}
    obs_s, writes_s = sum(s for _, s in log["prune"]), sum(s for _, s in log["writes"])
    return {"total": total, "stats": total - obs_s - writes_s, "obs": obs_s, "writes": writes_s,
            "per_kind": per_kind, "peak": peak[0], "before": before}


def compare_one_layer(model, calib, table, layer: int, batch_size: int) -> list[dict]:
    """The eager loop against obs_prune on one layer's Hessians, per kind.

    With group > 1 both run on one thread: the eager loop's batched `torch.linalg.inv` hangs in MKL on
    several threads for blocks this wide (see `obs._block_inverse`).
    """
    reference = eager_reference()
    (_, stats), = layerwise_stats(model, calib, KINDS, batch_size, gram=True, layers=[layer])
    rows, threads = [], torch.get_num_threads()
    for kind in KINDS:
        weight = target_linear(model.model.layers[layer], kind).weight
        group = weight.shape[1] // table.units(kind)
        counts = table.counts(kind)
        torch.set_num_threads(1 if group > 1 else threads)
        started = time.perf_counter()
        new = obs.obs_prune(weight, stats[kind].xtx, group, counts)
        new_s = time.perf_counter() - started
        started = time.perf_counter()
        old = reference(weight, stats[kind].xtx, group, counts)
        old_s = time.perf_counter() - started
        torch.set_num_threads(threads)
        diff = max(
            ((new.weights[c] - old.weights[c]).abs().max() / old.weights[c].abs().max().clamp_min(1e-30)).item()
            for c in counts
        )
        rows.append({"kind": kind, "shape": tuple(weight.shape), "group": group, "steps": max(counts),
                     "threads": 1 if group > 1 else threads, "old": old_s, "new": new_s,
                     "same_order": torch.equal(new.order, old.order), "diff": diff})
    return rows


def print_report(args, model, what: str, calib: torch.Tensor, table, built: dict, rows: list[dict]) -> None:
    cfg = model.config
    n_layers, hidden, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    print(f"\n{what}; {calib.numel()} calibration tokens ({calib.shape[0]} x {calib.shape[1]}), micro-batches of "
          f"{args.batch_size}; levels: attention {table.counts('attn')} {table.attention_unit}s, MLP steps of "
          f"{table.mlp_step} to {table.mlp_units}; {torch.get_num_threads()} torch threads\n")
    print(f"| {'obs database build':<40} | {'seconds':>8} |")
    print(f"|{'-' * 42}|{'-' * 10}|")
    for name, key in (("statistics (layer-by-layer forward + Gram)", "stats"), ("OBS, all layers", "obs"),
                      ("writes (safetensors, index)", "writes"), ("total", "total")):
        print(f"| {name:<40} | {built[key]:>8.1f} |")
    for kind in KINDS:
        s = built["per_kind"][kind]
        print(f"| {f'OBS {kind} per layer (min / mean / max)':<40} | {min(s):.2f} / {sum(s) / len(s):.2f} / "
              f"{max(s):.2f} |")
    print("\nOBS seconds per layer (attn + mlp): "
          + " ".join(f"{a + m:.2f}" for a, m in zip(*(built["per_kind"][k] for k in KINDS), strict=True)))
    per_layer = (hidden**2 + inter**2) * 8
    states = calib.numel() * hidden * 4
    print(f"\nHessians per layer (fp64 o_proj + down_proj): {per_layer / 2**20:.1f} MiB; held at once before "
          f"(one pass, {n_layers} layers): {n_layers * per_layer / 2**20:.0f} MiB; now one layer plus the cached "
          f"hidden states ({states / 2**20:.1f} MiB fp32). RSS before the build {built['before'] / 2**20:.0f} MiB "
          f"(the model's weights: {sum(p.nbytes for p in model.parameters()) / 2**20:.0f} MiB), peak while building "
          f"{built['peak'] / 2**20:.0f} MiB (one layer's level weights at a time)")
    print(f"\nLayer {args.reference_layer}, the eager greedy loop (before) against the blocked obs_prune (now), same "
          "Hessians and counts:\n")
    print(f"| {'kind':<4} | {'weight':>10} | {'group':>5} | {'steps':>5} | {'threads':>7} | {'eager s':>8} | "
          f"{'blocked s':>9} | {'old/new':>7} | {'same order':>10} | {'max rel diff':>12} |")
    print("|" + "|".join("-" * (w + 2) for w in (4, 10, 5, 5, 7, 8, 9, 7, 10, 12)) + "|")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"| {r['kind']:<4} | {shape:>10} | {r['group']:>5} | {r['steps']:>5} | {r['threads']:>7} | "
              f"{r['old']:>8.2f} | {r['new']:>9.2f} | {r['old'] / r['new']:>7.1f} | {str(r['same_order']):>10} | "
              f"{r['diff']:>12.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m", help="a model source, or `random`")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (Hessians and OBS run in fp64 there)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--levels", type=int, default=10)
    parser.add_argument("--mlp-multiple", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reference-layer", type=int, default=15, help="the layer the eager loop is timed on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, what = load_model(args.model, args.device, args.dtype)
    calib = calibration_tokens(tokenizer, model.config.vocab_size, args.tokens, args.seq_len, args.seed)
    table = levels.table_for(model, levels=args.levels, multiple=args.mlp_multiple)
    built = build(model, calib, table, args.batch_size)
    print(f"  built in {built['total']:.1f} s", flush=True)
    rows = compare_one_layer(model, calib, table, args.reference_layer, args.batch_size)
    print_report(args, model, what, calib, table, built, rows)


if __name__ == "__main__":
    main()
