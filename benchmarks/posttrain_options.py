"""Benchmark: post-training options from the sensitivity literature on one candidate, side by side.

A `builtin:tiny-llama` prune job's uniform candidate at `--target` (OBS database weights, as the search would
export it untrained) is post-trained the same way (`kd`, same tokens, seed and batches) by four arms: plain
AdamW; SeReNe's regulariser (`serene`, whose follow-up cut is a second, smaller front point); HierarchicalPrune's
per-block learning rates (`block_distill`); and both. Reported per arm: KL(dense ‖ candidate) on the fitness pool
and held out, held-out perplexity, parameters, and the cut point's. The same trainer as a `posttrain` job runs
(`workers.posttrain_job.Posttrainer`), in process.

    DARWINFRONT_CACHE_DIR=/tmp/dfcache .venv/bin/python benchmarks/posttrain_options.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from darwinfront.core.methods import parse_spec
from search.genome import LevelSpace
from workers.evaluator import Evaluator
from workers.posttrain_job import Posttrainer
from workers.prepare import prepare

SERENE = {"strength": 0.05, "threshold": 1.0, "cut": 0.5}
BLOCKS = {"freeze_early": 0, "cap": 4.0, "sequences": 8}
ARMS = {"plain": {}, "serene": {"serene": SERENE}, "block_distill": {"block_distill": BLOCKS},
        "both": {"serene": SERENE, "block_distill": BLOCKS}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=65536, help="post-training tokens of every arm")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--serene-strength", type=float, default=SERENE["strength"])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    p.add_argument("--json", default=None, help="write the full results here")
    return p.parse_args(argv)


def parent(args) -> tuple[dict, dict]:
    """The parent job's spec and the configuration of its uniform candidate (database weights, untrained)."""
    spec = parse_spec({"model": {"source": args.model, "device": args.device},
                       "prune": {"targets": [args.target], "training_aware": False},
                       "data": {"train_tokens": args.tokens}, "seed": 0}).model_dump(mode="json")
    prepared = prepare(spec)
    evaluator = Evaluator(spec, prepared, threads=args.threads)
    genome = LevelSpace.from_dict(prepared["space"]).uniform(args.target)
    configuration = evaluator.configuration({"genome": genome.to_dict(), "seed": 0, "train_tokens": 0},
                                            {"candidate_id": "uniform", "target": args.target})
    return spec, configuration


def bench_arm(args, spec: dict, configuration: dict, options: dict) -> dict:
    started = time.perf_counter()
    trainer = Posttrainer(spec, configuration, None, {"tokens": args.tokens, "lr": args.lr, "loss": "kd",
                                                      **options}, threads=args.threads)
    before = trainer.measure()
    for _ in range(trainer.describe()["steps"]):
        trainer.step()
    out = {"before": before, "after": trainer.measure(), "parameters": trainer.describe()["parameters"]}
    cut = trainer.follow_up_cut()
    if cut is not None:
        out["cut"] = {"parameters": cut["parameters"], "removed": cut["removed"], **trainer.measure("cut")}
    out["seconds"] = time.perf_counter() - started
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    SERENE["strength"] = args.serene_strength
    spec, configuration = parent(args)
    results = {}
    for arm in args.arms:
        options = ARMS[arm]
        results[arm] = out = bench_arm(args, spec, configuration, options)
        after = out["after"]
        line = (f"{arm:14s} params {out['parameters']:,}  KL {out['before']['kl']:.4f} -> {after['kl']:.4f}  "
                f"held-out KL {after['held_out_kl']:.4f}  ppl {after['perplexity']:.2f}")
        if "cut" in out:
            cut = out["cut"]
            line += (f"  | cut: params {cut['parameters']:,} ({sum(cut['removed'].values())} units)  KL "
                     f"{cut['kl']:.4f}  held-out KL {cut['held_out_kl']:.4f}  ppl {cut['perplexity']:.2f}")
        print(f"{line}  {out['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
