"""Forward-pass time of a physically sliced model against its dense parent, in one process.

Builds (or loads) a reference model, scores its units with a criterion, slices a copy to the uniform layout
at `--target`, and times dense and sliced forward passes interleaved (dense, sliced, dense, ...) so that machine
noise hits both alike; the figure is the ratio of the medians. Also prints the KL of the sliced model to the
dense one on held-out text, so a fast but broken cut would show.

    .venv/bin/python benchmarks/pruned_speed.py --model builtin:tiny-llama --target 0.5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from workers import criteria, data, fitness, levels, modeling, slicing


@torch.inference_mode()
def time_interleaved(models: dict, tokens: torch.Tensor, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per forward pass of each model, measured in alternation."""
    times = {name: [] for name in models}
    for i in range(warmup + repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=tokens, use_cache=False)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--criterion", default="wanda_sp")
    parser.add_argument("--mlp-step", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense, tokenizer = modeling.load_model(args.model, device="cpu")
    texts = data.load_texts("builtin:pydoc")
    calibration = data.token_sequences(tokenizer, texts, n_tokens=4096, seq_len=128, split="calibration", seed=0)
    held_out = data.token_sequences(tokenizer, texts, n_tokens=4096, seq_len=128, split="evaluation", seed=0)
    scores = criteria.get(args.criterion).score(dense, calibration)
    d = slicing.dims(dense)
    table = levels.LevelTable(d.n_kv, 1, d.intermediate, args.mlp_step)  # one KV group per attention level
    space = levels.level_space(dense, table)
    genome = space.uniform(args.target)
    layout = levels.layout(genome, levels.removal_orders(scores), table)
    sliced = slicing.slice_model(copy.deepcopy(dense), layout)
    assert slicing.count_parameters(sliced) == space.params(genome)

    tokens = torch.randint(0, dense.config.vocab_size, (args.batch, args.seq_len))  # (B, T)
    times = time_interleaved({"dense": dense, "sliced": sliced}, tokens, args.repeats)
    dense_s, sliced_s = statistics.median(times["dense"]), statistics.median(times["sliced"])
    kl = fitness.kl(sliced, held_out, fitness.Teacher.of(dense, held_out))

    n_dense, n_sliced = slicing.count_parameters(dense), slicing.count_parameters(sliced)
    print(f"model {args.model}  criterion {scores.criterion}  target {args.target}  genome {genome.key()}")
    print(f"threads {torch.get_num_threads()}  batch {args.batch} x {args.seq_len} tokens  repeats {args.repeats}")
    print(f"params   dense {n_dense:,}  sliced {n_sliced:,}  ratio {n_sliced / n_dense:.3f}")
    print(f"forward  dense {dense_s * 1e3:.1f} ms  sliced {sliced_s * 1e3:.1f} ms  (medians)")
    print(f"ratio sliced/dense {sliced_s / dense_s:.3f}  (goal <= 0.65)")
    print(f"held-out KL(dense || sliced) {kl:.4f} nats/token")


if __name__ == "__main__":
    main()
