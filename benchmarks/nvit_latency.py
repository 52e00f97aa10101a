"""NViT's global latency-aware cut against a uniform cut at the same predicted saving: measured latency and KL.

Measures this machine's latency table (`workers.nvit_global.measure_latency_table`: ms saved per attention unit,
per MLP channel and per whole sub-layer), scores every unit and block with NViT's Fisher saliency
(`workers.criteria.nvit.saliencies`), and cuts the model until the predicted saving reaches `--target` of the
dense forward time, three ways:

* `global I/ms`: units and blocks of every layer in one list, by saliency per millisecond saved;
* `global λ`: NViT's I − λ·ΔLat (`--lam`; 0 = saliency alone, the latency only setting when to stop);
* `uniform`: the same fraction of attention units and MLP channels in every layer (NViT's order inside a layer),
  the smallest fraction whose predicted saving reaches the target.

Each cut is sliced, timed again (the measured saving is what counts) and scored by KL(dense ‖ pruned) per token on
held-out tokens.

    .venv/bin/python -m benchmarks.nvit_latency --threads 1                       # builtin:tiny-llama
    .venv/bin/python -m benchmarks.nvit_latency --model builtin:smollm2-135m --calibration-tokens 512
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.criteria import unit_table
from search.genome import PruneGenome
from workers import data, fitness, levels, modeling, slicing
from workers.criteria.base import LayerScores, UnitScores
from workers.criteria.nvit import saliencies
from workers.latency import forward_latency
from workers.nvit_global import LatencyTable, global_ranking, latency_cut, measure_latency_table


def uniform_cut(table: LatencyTable, d: slicing.Dims, unit: str, target_ms: float) -> tuple[PruneGenome, float]:
    """The smallest fraction (in 1 % steps) of every layer's units and channels whose predicted saving reaches
    `target_ms` (the largest one below a whole sub-layer when none does)."""
    units = d.attn_units(unit)
    best = None
    for pct in range(1, 100):
        a, m = min(units - 1, round(pct / 100 * units)), min(d.intermediate - 1, round(pct / 100 * d.intermediate))
        saved = d.n_layers * (a * table.unit_ms["attn"] + m * table.unit_ms["mlp"])
        best = (PruneGenome(attn=(a,) * d.n_layers, mlp=(m,) * d.n_layers), saved)
        if saved >= target_ms:
            break
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--data", default="builtin:pydoc")
    parser.add_argument("--target", type=float, default=0.25, help="fraction of the dense forward time to save")
    parser.add_argument("--lam", type=float, default=0.0, help="λ of the `global λ` arm (I − λ·ms)")
    parser.add_argument("--attention-unit", choices=("kv_group", "q_head"), default="kv_group")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--latency-batch", type=int, default=1, help="sequences per timed forward pass")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per measurement (median)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = modeling.load_model(args.model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    texts = data.load_texts(args.data)
    calib, held = (
        data.token_sequences(tokenizer, texts, n_tokens=n, seq_len=args.seq_len, split=split, seed=args.seed).to(device)
        for split, n in (("calibration", args.calibration_tokens), ("evaluation", args.eval_tokens))
    )
    dense = fitness.Teacher.of(model, held, batch_size=args.batch_size)
    timing = {"batch_size": args.latency_batch, "seq_len": args.seq_len, "repeats": args.repeats}
    table = measure_latency_table(model, attention_unit=args.attention_unit, **timing)
    units, blocks = saliencies(model, calib, batch_size=args.batch_size, attention_unit=args.attention_unit)
    orders = levels.removal_orders(UnitScores(tuple(LayerScores(**u) for u in units), "nvit"))
    d, target_ms = slicing.dims(model), args.target * table.dense_ms
    arms = {
        "global I/ms": latency_cut(global_ranking(units, blocks, table), table, d, target_ms, args.attention_unit),
        f"global λ={args.lam:g}": latency_cut(global_ranking(units, blocks, table, args.lam), table, d, target_ms,
                                             args.attention_unit),
        "uniform": uniform_cut(table, d, args.attention_unit, target_ms),
    }
    print(f"\n{args.model}: dense forward {table.dense_ms:.1f} ms (batch {args.latency_batch} × {args.seq_len} tokens, "
          f"median of {args.repeats}, {torch.get_num_threads()} torch threads, {device}); ms saved per attention unit "
          f"{table.unit_ms['attn']:.3f}, per MLP channel {table.unit_ms['mlp']:.4f}, per attention block "
          f"{table.block_ms['attn']:.2f}, per MLP block {table.block_ms['mlp']:.2f}; target: save "
          f"{args.target:.0%} ({target_ms:.1f} ms); KL on {held.numel()} held-out tokens\n")
    print("| cut | predicted ms saved | measured ms | speed-up | parameters | blocks removed | KL |")
    print("|---|---|---|---|---|---|---|")
    total = {"attn": d.attn_units(args.attention_unit), "mlp": d.intermediate}
    for name, (genome, predicted) in arms.items():
        pruned = slicing.slice_model(copy.deepcopy(model), levels.layout(genome, orders, unit_table(model,
                                                                                                   args.attention_unit)))
        ms = forward_latency(pruned, **timing)["median_ms"]
        gone = sum(a == total["attn"] for a in genome.attn) + sum(m == total["mlp"] for m in genome.mlp)
        kl = fitness.kl(pruned, held, dense, batch_size=args.batch_size)
        print(f"| {name} | {predicted:.1f} | {ms:.1f} | {table.dense_ms / ms:.2f}× | "
              f"{slicing.count_parameters(pruned):,} | {gone} | {kl:.3e} |", flush=True)
        del pruned


if __name__ == "__main__":
    main()
