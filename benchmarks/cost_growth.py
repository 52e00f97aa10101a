"""How the search's costs grow with the model: level database (statistics, OBS, bytes), teacher bytes, evaluation.

Four shapes: `builtin:tiny-llama`, the real SmolLM2-135M (`builtin:smollm2-135m`), and random-init models at the
shapes of Qwen2.5-0.5B (Qwen2ForCausalLM) and Llama-3.2-1B (LlamaForCausalLM). Costs depend on the shapes, not on
the weights, so every shape is measured on its first `--layers` decoder layers (the loaded models truncated, the
random ones built that deep) with its real embedding / LM head, and extrapolated to all layers linearly:

- database: `database.build` (obs criterion, `levels.table_for` with 10 levels and MLP multiple 8) on
  `--tokens` random calibration ids; OBS seconds per layer and kind (every `obs_prune` call timed, as
  `benchmarks/database_build.py` times them), the statistics pass per layer (`layerwise_stats` with Gram, timed
  alone), peak RSS of the process during the build (psutil sampling: `database_build.peak_rss`), and the level
  files' bytes on disk against the exact size (fp32 o_proj and down_proj at every level >= 1);
- teacher outputs: exact bytes of the default pools (2,048 fitness + 4,096 held-out tokens, sequences of 128),
  full table against `kl_topk: auto`, checked against `fitness.Teacher.of(...).nbytes` on the KL tokens;
- one evaluation at a 50 % target: the evaluator's steps (the uniform genome's sliced candidate built with the
  database's weights by `candidate.build`, then `evaluation_cost.bare_evaluation`: train `--train-tokens` + KL on
  `--kl-tokens`, the shared weights put back untimed), and the dense model's train + KL and forward + KL.

Then log-log fits of the growth, and the same formulas applied on paper to Llama-3.1-8B / 70B (`--paper`).

    PYTHONPATH=. DARWINFRONT_CACHE_DIR=/work/.cache-dev .venv/bin/python -u benchmarks/cost_growth.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import torch
from torch import nn

from benchmarks.database_build import calibration_tokens, peak_rss, timing_obs
from benchmarks.evaluation_cost import bare_evaluation
from workers import candidate, database, finetune, fitness, levels, modeling
from workers.criteria._common import KINDS, layerwise_stats

RANDOM = {  # full shapes of the config-only models (from their published configs)
    "qwen2.5-0.5b": ("Qwen2", dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                                   num_key_value_heads=2, head_dim=64, intermediate_size=4864, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)),
    "llama-3.2-1b": ("Llama", dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                                   tie_word_embeddings=True, rope_theta=5e5, rms_norm_eps=1e-5)),
}
PAPER = {  # Llama-3.1 shapes for the on-paper projection (untied embeddings), in `shape_of`'s keys
    "llama-3.1-8b": dict(layers=32, hidden=4096, heads=32, kv=8, head_dim=128, inter=14336, vocab=128256, tied=False),
    "llama-3.1-70b": dict(layers=80, hidden=8192, heads=64, kv=8, head_dim=128, inter=28672, vocab=128256,
                          tied=False),
}
POOLS = {"fitness": 2048, "held-out": 4096}  # the job defaults (data.calibration_tokens, data.eval_tokens)
SEQ_LEN = 128
GiB, MiB = 2**30, 2**20


# ---------------------------------------------------------------- shapes and exact sizes (no model needed)

def shape_of(config) -> dict:
    """The numbers every formula below reads, from a transformers config."""
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": heads,
            "kv": config.num_key_value_heads, "head_dim": hd, "inter": config.intermediate_size,
            "vocab": config.vocab_size, "tied": bool(getattr(config, "tie_word_embeddings", False))}


def level_table(s: dict) -> levels.LevelTable:
    """`levels.table_for`'s table for 10 levels, MLP multiple 8, KV-group units, from the shape alone."""
    return levels.LevelTable(attn_units=s["kv"], attn_step=levels.attention_step(s["kv"], 10),
                             mlp_units=s["inter"], mlp_step=levels.mlp_step(s["inter"], 10, 8))


def layer_params(s: dict) -> int:
    """Linear weights of one decoder layer (biases and norms left out)."""
    q = s["heads"] * s["head_dim"]
    kv = s["kv"] * s["head_dim"]
    return s["hidden"] * (2 * q + 2 * kv) + 3 * s["hidden"] * s["inter"]


def database_bytes(s: dict, table: levels.LevelTable, layers: int | None = None) -> int:
    """Bytes of the level weights an obs database writes: fp32 o_proj and down_proj at every level >= 1."""
    o_proj = s["hidden"] * s["heads"] * s["head_dim"] * 4
    down = s["hidden"] * s["inter"] * 4
    per_layer = table.attn_levels * o_proj + table.mlp_levels * down
    return per_layer * (s["layers"] if layers is None else layers)


def teacher_bytes(vocab: int, tokens: int, topk: int | str | None) -> int:
    """Bytes `fitness.Teacher` holds for `tokens` in sequences of SEQ_LEN: 4·vocab or 12·k per predicted position."""
    positions = (tokens // SEQ_LEN) * (SEQ_LEN - 1)
    k = fitness.resolve_topk(topk, vocab)
    return positions * (4 * vocab if k is None else 12 * k)


def obs_flops(width: int, out: int) -> float:
    """fp64 FLOPs of greedy OBS removing all `width` columns of an (out, width) weight: Cholesky inverse of H
    (~N³), then per removal the W update (2·out·n) and the Hinv downdate (2·n²) over the n alive columns,
    summed: out·N² + 2/3·N³."""
    return width**3 + out * width**2 + 2 / 3 * width**3


def gram_flops(s: dict, tokens: int) -> float:
    """fp64 FLOPs of the two Gram matrices XᵀX (o_proj and down_proj inputs) of one layer."""
    return 2 * tokens * ((s["heads"] * s["head_dim"]) ** 2 + s["inter"] ** 2)


# ---------------------------------------------------------------- models

def truncated(model: nn.Module, layers: int) -> nn.Module:
    """`model` with only its first `layers` decoder layers (the config says so too)."""
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def load(name: str, layers: int) -> tuple[nn.Module, dict, str]:
    """(model cut to `layers` layers, full shape, what it is)."""
    if name in RANDOM:
        family, shape = RANDOM[name]
        import transformers

        config = getattr(transformers, f"{family}Config")(**{**shape, "num_hidden_layers": layers},
                                                          max_position_embeddings=4096)
        torch.manual_seed(0)
        model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
        return model, {**shape_of(config), "layers": shape["num_hidden_layers"]}, f"random-init {family}"
    model, _ = modeling.load_model(f"builtin:{name}", device="cpu")
    full = shape_of(model.config)
    return truncated(model, min(layers, full["layers"])), full, "pretrained"


def matmul_params(model: nn.Module) -> int:
    """Weights of every nn.Linear (the LM head included, tied or not): what a forward pass multiplies by."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


# ---------------------------------------------------------------- measurements

@contextmanager
def timing_writes():
    """Time every safetensors write the database build makes (`database.save_file`, wrapped)."""
    log, real = [], database.save_file

    def timed(*args, **kwargs):
        started = time.perf_counter()
        real(*args, **kwargs)
        log.append(time.perf_counter() - started)

    database.save_file = timed
    try:
        yield log
    finally:
        database.save_file = real


def measure_database(model, calib, table, root: Path, batch_size: int) -> dict:
    """Build the obs database of the (truncated) model; OBS per layer and kind, writes, peak RSS, bytes."""
    n = model.config.num_hidden_layers
    started = time.perf_counter()
    for _ in layerwise_stats(model, calib, KINDS, batch_size, gram=True):
        pass  # the statistics pass alone: forward layer by layer + fp64 Grams
    stats_s = time.perf_counter() - started
    before = psutil.Process().memory_info().rss
    with timing_obs() as log, timing_writes() as writes, peak_rss() as peak:
        started = time.perf_counter()
        db = database.build(model, calib, criterion="obs", table=table, root=root,
                            options={"batch_size": batch_size})
        total = time.perf_counter() - started
    assert db.built and db.n_layers == n
    prunes = [s for _, s in log["prune"]]  # per layer: attn, then mlp (iter_obs_levels' order)
    attn, mlp = prunes[0::2], prunes[1::2]
    on_disk = sum(p.stat().st_size for p in db.directory.glob("layer*.safetensors"))
    return {"db": db, "stats_layer": stats_s / n, "obs_attn": statistics.mean(attn), "obs_mlp": statistics.mean(mlp),
            "writes_layer": sum(writes) / n, "build": total, "rss_before": before, "rss_peak": peak[0],
            "on_disk": on_disk}


def measure_evaluation(model, db, args) -> dict:
    """One 50 % candidate the evaluator's way (build + train + KL) and the dense model, median of repeats."""
    vocab = model.config.vocab_size
    pool = calibration_tokens(None, vocab, args.train_tokens, SEQ_LEN, seed=1)
    kl_tokens = calibration_tokens(None, vocab, args.kl_tokens, SEQ_LEN, seed=2)
    teacher = fitness.Teacher.of(model, kl_tokens, topk="auto")
    bench = SimpleNamespace(inputs=SimpleNamespace(training=pool, calibration=kl_tokens), teacher=teacher,
                            train_settings=finetune.TrainSettings())
    space = levels.level_space(model, db.table)
    genome = space.uniform(0.5)
    weights = candidate.LevelWeights(db, model.model.layers[0].self_attn.o_proj.weight)
    snapshot = finetune.Snapshot([p for p in model.parameters() if p.requires_grad])
    times = {"candidate": [], "dense": [], "forward": []}
    sliced_params = 0
    for _ in range(args.repeats + 1):  # the first round warms up and is not counted
        started = time.perf_counter()
        cand = candidate.build(model, db, genome, weights=weights, trainable=True)
        bare_evaluation(cand, bench, args.train_tokens)
        times["candidate"].append(time.perf_counter() - started)
        sliced_params = matmul_params(cand)
        del cand
        snapshot.restore()
        started = time.perf_counter()
        bare_evaluation(model, bench, args.train_tokens)
        times["dense"].append(time.perf_counter() - started)
        snapshot.restore()
        started = time.perf_counter()
        fitness.kl(model, kl_tokens, teacher)
        times["forward"].append(time.perf_counter() - started)
    head = vocab * model.config.hidden_size
    dense_params = matmul_params(model)
    return {**{k: statistics.median(v[1:]) for k, v in times.items()}, "teacher_nbytes": teacher.nbytes,
            "teacher_expected": teacher_bytes(vocab, args.kl_tokens, "auto"),
            "decoder_kept": (sliced_params - head) / (dense_params - head), "mm_sliced": sliced_params,
            "mm_dense": dense_params}


def measure(name: str, args, root: Path) -> dict:
    model, full, what = load(name, args.layers)
    for p in model.parameters():
        p.requires_grad_(True)
    table = levels.table_for(model, levels=10, multiple=8)
    assert table == level_table(full), (table, level_table(full))
    calib = calibration_tokens(None, full["vocab"], args.tokens, SEQ_LEN, seed=0)
    row = {"name": name, "what": what, "shape": full, "measured_layers": model.config.num_hidden_layers,
           "table": table}
    row |= measure_database(model, calib, table, root, args.batch_size)
    row |= measure_evaluation(model, row["db"], args)
    row["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print({k: v for k, v in row.items() if k not in ("db", "table")}, flush=True)
    return row


# ---------------------------------------------------------------- report

def fit(xs, ys) -> float:
    """Exponent p of y ∝ x^p, least squares in log-log."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def extrapolate(r: dict, args) -> dict:
    """Full-depth figures: per-layer times × layers; evaluation × matmul weights (full depth / measured)."""
    s, k = r["shape"], r["measured_layers"]
    layers_mm = r["mm_dense"] - s["vocab"] * s["hidden"]  # the measured layers' linears (the LM head apart)
    head = s["vocab"] * s["hidden"]
    dense_full = head + layers_mm * s["layers"] / k
    sliced_full = head + (r["mm_sliced"] - head) * s["layers"] / k
    return {"stats_db": s["layers"] * r["stats_layer"] * args.database_tokens / args.tokens,
            "obs_all": s["layers"] * (r["obs_attn"] + r["obs_mlp"]),
            "db_bytes": database_bytes(s, r["table"]),
            "eval": r["candidate"] * sliced_full / r["mm_sliced"], "dense": r["dense"] * dense_full / r["mm_dense"],
            "forward": r["forward"] * dense_full / r["mm_dense"], "mm_full": dense_full}


def print_measured(rows: list[dict], args) -> None:
    print(f"\nMeasured on the first {args.layers} layers of each shape; {args.tokens} calibration tokens "
          f"(sequences of {SEQ_LEN}), {torch.get_num_threads()} torch thread(s)\n")
    print("| shape | layers x hidden / MLP / vocab | table (attn x step, mlp x step) | stats s/layer | "
          "OBS attn s/layer | OBS mlp s/layer | writes s/layer | RSS before / peak MiB | level bytes on disk / "
          "exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, t = r["shape"], r["table"]
        exact = database_bytes(s, t, r["measured_layers"])
        print(f"| {r['name']} ({r['what']}) | {s['layers']} x {s['hidden']} / {s['inter']} / {s['vocab']} | "
              f"{t.attn_levels} x {t.attn_step}, {t.mlp_levels} x {t.mlp_step} | {r['stats_layer']:.3f} | "
              f"{r['obs_attn']:.3f} | {r['obs_mlp']:.2f} | {r['writes_layer']:.3f} | "
              f"{r['rss_before'] / MiB:.0f} / {r['rss_peak'] / MiB:.0f} | {r['on_disk']:,} / {exact:,} |")
    print(f"\nOne evaluation at 50 % (train {args.train_tokens} + KL {args.kl_tokens} tokens), median of "
          f"{args.repeats} after a warm-up, on the measured layers:\n")
    print("| shape | decoder weights kept | candidate s | dense train+KL s | dense forward+KL s | teacher bytes "
          "(Teacher.of / formula) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['decoder_kept']:.3f} | {r['candidate']:.2f} | {r['dense']:.2f} | "
              f"{r['forward']:.2f} | {r['teacher_nbytes']:,} / {r['teacher_expected']:,} |")


def print_full(rows: list[dict], args) -> None:
    print(f"\nFull depth (extrapolated: per-layer times x layers; evaluation x matmul weights); statistics at "
          f"the default database_tokens {args.database_tokens} (x tokens / {args.tokens}):\n")
    print("| shape | params | stats s | OBS s | database GiB | teacher full / auto MiB | eval s | dense "
          "train+KL s | dense fwd+KL s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, s = r["full"], r["shape"]
        pools = sum(POOLS.values())
        full_t, auto_t = teacher_bytes(s["vocab"], pools, None), teacher_bytes(s["vocab"], pools, "auto")
        print(f"| {r['name']} | {e['mm_full'] / 1e6:.0f} M | {e['stats_db']:.1f} | {e['obs_all']:.1f} | "
              f"{e['db_bytes'] / GiB:.3f} | {full_t / MiB:.1f} / {auto_t / MiB:.1f} | {e['eval']:.2f} | "
              f"{e['dense']:.2f} | {e['forward']:.2f} |")
    mlp = [r["shape"]["inter"] for r in rows]
    attn = [r["shape"]["heads"] * r["shape"]["head_dim"] for r in rows]
    rate = [(obs_flops(r["shape"]["inter"], r["shape"]["hidden"]) + obs_flops(a, r["shape"]["hidden"]))
            / (r["obs_mlp"] + r["obs_attn"]) / 1e9 for r, a in zip(rows, attn, strict=True)]
    print("\nFitted growth (log-log least squares over the shapes):")
    print(f"  OBS mlp s/layer ∝ MLP width^{fit(mlp, [r['obs_mlp'] for r in rows]):.2f}  (widths {mlp})")
    print(f"  OBS attn s/layer ∝ o_proj width^{fit(attn, [r['obs_attn'] for r in rows]):.2f}  (widths {attn})")
    print("  OBS achieved fp64 GFLOP/s against the formula out·N² + 5/3·N³: " + ", ".join(f"{x:.1f}" for x in rate))
    per_layer = [layer_params(r["shape"]) for r in rows]
    print(f"  stats s/layer ∝ layer weights^{fit(per_layer, [r['stats_layer'] for r in rows]):.2f}")
    full = [r["full"]["mm_full"] for r in rows]
    print(f"  evaluation s ∝ matmul weights^{fit(full, [r['full']['eval'] for r in rows]):.2f}, dense train+KL "
          f"^{fit(full, [r['full']['dense'] for r in rows]):.2f}, dense forward ^"
          f"{fit(full, [r['full']['forward'] for r in rows]):.2f}")
    ratio = [r["candidate"] / r["dense"] for r in rows]
    print("  candidate / dense train+KL: " + ", ".join(f"{x:.2f}" for x in ratio))
    rates = [6 * r["mm_sliced"] * args.train_tokens / r["candidate"] / 1e9 for r in rows]
    print("  candidate effective GFLOP/s (6·weights·train tokens / s): " + ", ".join(f"{x:.0f}" for x in rates))


# ---------------------------------------------------------------- on paper

GPU = {  # dense peak TFLOP/s and memory; H200 is H100's compute with more and faster HBM
    "H100 SXM": {"fp64": 67, "fp32": 67, "bf16": 989, "mem_gb": 80, "tb_s": 3.35},
    "H200": {"fp64": 67, "fp32": 67, "bf16": 989, "mem_gb": 141, "tb_s": 4.8},
}
EFFICIENCY = 0.5  # of peak for the large GEMMs (Gram, forward, training)
STEP_OVERHEAD_S = 150e-6  # per greedy OBS step: ~30 small kernels x ~5 us launch / sync
DARWINLM = {"generations": 200, "stages": [(16, 1024, 10_000), (8, 2048, 50_000), (4, 4096, 100_000),
                                           (3, 8192, 200_000)], "database_tokens": 16_777_216}
OURS = {"generations": 30, "stages": [(16, 256, 2048), (8, 512, 8192), (4, 1024, 16384), (3, 2048, 32768)],
        "database_tokens": 16_384}  # candidates per stage (the last holds 2 survivors + the parent), KL, train


def paper(name: str, s: dict, gpu: dict) -> dict:
    """What one search of `s` costs on one GPU of `gpu` with this code, from shapes and stated throughputs."""
    table = level_table(s)
    o_w, hidden, inter, n_layers = s["heads"] * s["head_dim"], s["hidden"], s["inter"], s["layers"]
    lp = layer_params(s)
    head = s["vocab"] * hidden
    dense = lp * n_layers + head * (1 if s["tied"] else 2)
    out = {"name": name, "params": dense, "db_bytes": database_bytes(s, table), "table": table}
    # OBS: compute-bound part (fp64) + the per-step floor + reading Wᵀ every step (memory-bound GEMV)
    obs_compute = (obs_flops(inter, hidden) + obs_flops(o_w, hidden)) / (gpu["fp64"] * 1e12 * EFFICIENCY)
    steps = inter + table.attn_units
    reads = (inter**2 / 2 * hidden + o_w**2 / 2 * hidden) * 8 / (gpu["tb_s"] * 1e12)
    out["obs_layer_s"] = obs_compute + steps * STEP_OVERHEAD_S + reads
    out["hessian_bytes"] = 8 * (inter**2 + o_w**2)
    # a candidate with every layer at a level >= 1 reads one fp32 o_proj and down_proj per layer from the
    # database (`candidate.LevelWeights`, an LRU of 256 MiB by default: at these sizes it holds about one)
    out["read_bytes"] = n_layers * 4 * hidden * (o_w + inter)
    for tag, sched in (("ours", OURS), ("darwinlm", DARWINLM)):
        t = sched["database_tokens"]
        gram = gram_flops(s, t) / (gpu["fp64"] * 1e12 * EFFICIENCY)
        forward = 2 * lp * t / (gpu["fp32"] * 1e12 * EFFICIENCY)  # the model in fp32, this code's default dtype
        out[f"db_{tag}_s"] = n_layers * (gram + forward + out["obs_layer_s"])
        out[f"cache_{tag}_bytes"] = t * hidden * 4  # the hidden states layerwise_stats keeps on the device
        kept = 0.5 * lp * n_layers + head * (1 if s["tied"] else 2)  # 50 % of the decoder, embeddings whole
        train = sum(n * tr for n, _, tr in sched["stages"]) * sched["generations"]
        kl = sum(n * f for n, f, _ in sched["stages"]) * sched["generations"]
        flops = 6 * kept * train + 2 * kept * kl
        out[f"train_tokens_{tag}"], out[f"kl_tokens_{tag}"] = train, kl
        out[f"search_{tag}_bf16_h"] = flops / (gpu["bf16"] * 1e12 * EFFICIENCY) / 3600
        out[f"search_{tag}_fp32_h"] = flops / (gpu["fp32"] * 1e12 * EFFICIENCY) / 3600
        out["kept"] = kept
    pools = sum(POOLS.values())
    out["teacher_full"], out["teacher_auto"] = teacher_bytes(s["vocab"], pools, None), teacher_bytes(
        s["vocab"], pools, "auto")
    # memory of one evaluator: dense model + trainable candidate with AdamW (weights, grads, 2 moments)
    out["mem_fp32_gb"] = (dense * 4 + out["kept"] * 16) / 1e9
    out["mem_bf16_gb"] = (dense * 2 + out["kept"] * 8) / 1e9
    return out


def print_paper() -> None:
    for gname, gpu in GPU.items():
        print(f"\nOn paper, one {gname} ({gpu['fp64']} TF fp64 / {gpu['fp32']} fp32 / {gpu['bf16']} bf16 dense, "
              f"{gpu['mem_gb']} GB, {gpu['tb_s']} TB/s), {EFFICIENCY:.0%} of peak, {STEP_OVERHEAD_S * 1e6:.0f} us "
              "per OBS step:\n")
        print("| model | params | database GiB | Hessians/layer GiB | OBS s/layer | DB build h (16,384 / 16.8 M "
              "tokens) | hidden cache GiB (16,384 / 16.8 M) | teacher full / auto MiB | evaluator GB fp32 / bf16 "
              "| search h ours bf16 / fp32 | search h DarwinLM bf16 / fp32 | tokens trained ours / DarwinLM | level "
              "weights read per evaluation GiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, shape in PAPER.items():
            p = paper(name, shape, gpu)
            print(f"| {name} | {p['params'] / 1e9:.2f} B | {p['db_bytes'] / GiB:.0f} | "
                  f"{p['hessian_bytes'] / GiB:.2f} | {p['obs_layer_s']:.1f} | {p['db_ours_s'] / 3600:.2f} / "
                  f"{p['db_darwinlm_s'] / 3600:.1f} | {p['cache_ours_bytes'] / GiB:.2f} / "
                  f"{p['cache_darwinlm_bytes'] / GiB:.0f} | {p['teacher_full'] / MiB:.0f} / "
                  f"{p['teacher_auto'] / MiB:.1f} | {p['mem_fp32_gb']:.0f} / {p['mem_bf16_gb']:.0f} | "
                  f"{p['search_ours_bf16_h']:.2f} / {p['search_ours_fp32_h']:.1f} | "
                  f"{p['search_darwinlm_bf16_h']:.1f} / {p['search_darwinlm_fp32_h']:.0f} | "
                  f"{p['train_tokens_ours'] / 1e6:.1f} M / {p['train_tokens_darwinlm'] / 1e6:.0f} M | "
                  f"{p['read_bytes'] / GiB:.0f} |")


def check_full_build(row: dict, args, root: Path) -> None:
    """Build `row`'s whole database and compare its time with the linear extrapolation from the measured layers."""
    model, full, _ = load(row["name"], 10**6)
    calib = calibration_tokens(None, full["vocab"], args.tokens, SEQ_LEN, seed=0)
    got = measure_database(model, calib, row["table"], root, args.batch_size)
    guess = full["layers"] * (row["stats_layer"] + row["obs_attn"] + row["obs_mlp"] + row["writes_layer"])
    print(f"\n{row['name']}, all {full['layers']} layers at {args.tokens} tokens: database.build {got['build']:.1f} s "
          f"(+ the statistics pass alone {got['stats_layer'] * full['layers']:.1f} s), OBS "
          f"{full['layers'] * (got['obs_attn'] + got['obs_mlp']):.1f} s; extrapolated from "
          f"{row['measured_layers']} layers: {guess:.1f} s (ratio measured / extrapolated "
          f"{got['build'] / guess:.2f}); level bytes on disk {got['on_disk']:,}, exact "
          f"{database_bytes(full, row['table']):,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m", *RANDOM])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers measured per shape")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens of the measured build")
    parser.add_argument("--database-tokens", type=int, default=16_384, help="tokens the full build is scaled to")
    parser.add_argument("--train-tokens", type=int, default=1024)
    parser.add_argument("--kl-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paper-only", action="store_true", help="print the on-paper projection only")
    parser.add_argument("--json", type=Path, help="also write the measured rows here")
    parser.add_argument("--check-full", nargs="*", default=[], help="models whose whole database is also built")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.paper_only:
        rows = []
        with tempfile.TemporaryDirectory(prefix="darwinfront-growth-") as tmp:
            for name in args.models:
                rows.append(measure(name, args, Path(tmp)))
                rows[-1]["full"] = extrapolate(rows[-1], args)
            for row in rows:
                if row["name"] in args.check_full:
                    check_full_build(row, args, Path(tmp))
        if args.json:
            skip = ("db", "table")
            args.json.write_text(json.dumps([{k: v for k, v in r.items() if k not in skip} for r in rows], indent=1))
        print_measured(rows, args)
        print_full(rows, args)
    print_paper()


if __name__ == "__main__":
    main()
