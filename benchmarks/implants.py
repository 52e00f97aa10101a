"""Benchmark: the search with and without HAP's neural implants as a level kind, at one target and equal budgets.

For each seed, two jobs that differ only in `prune.implants` ([] against ["attn", "mlp"]) run the same staged
(1+λ) evolution scored as cut (EvoPress; `--training-aware` for DarwinLM's light training) from the uniform
levels, with the same budget. An implant costs exactly what its pruned level keeps, so both arms search the same
parameter count; the implants arm can also turn a sub-layer into a fitted rank-r map. Reported per arm: the
winner's fitness (KL on the fitness pool), its held-out KL and perplexity (one-shot, database weights), how many
sub-layers of the winner are implants, and the arm's wall time (database build included). With `--swaps`, it
first compares, on the uniform genome of the target with one layer moved to an implant level, that layer pruned
against the same layer as an implant (KL on the fitness pool, mean over the layers).

    DARWINFRONT_CACHE_DIR=/tmp/dfcache .venv/bin/python benchmarks/implants.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from prune_search import run

from darwinfront.core.methods import parse_spec
from search import strategies
from search.genome import PruneGenome
from search.strategy import Stage
from workers.evaluator import Evaluator
from workers.prepare import prepare
from workers.prune_job import stages_for

ARMS = {"pruned levels": [], "with implants": ["attn", "mlp"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--criterion", default="obs")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--generations", type=int, default=6, help="evolution generations (the budget follows)")
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--training-aware", action="store_true", help="DarwinLM's light training in every stage")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    p.add_argument("--swaps", action="store_true", help="also compare single pruned levels with their implants")
    p.add_argument("--json", default=None, help="write the full results here")
    return p.parse_args(argv)


def job_spec(args, seed: int, implants: list[str]) -> dict:
    return parse_spec({
        "model": {"source": args.model, "device": args.device},
        "data": {"calibration_tokens": args.calibration_tokens, "eval_tokens": args.eval_tokens},
        "prune": {"targets": [args.target], "criterion": args.criterion, "training_aware": args.training_aware,
                  "implants": implants},
        "search": {"generations": args.generations, "offspring": args.offspring},
        "seed": seed,
    }).model_dump(mode="json")


def bench_arm(args, seed: int, implants: list[str]) -> dict:
    started = time.perf_counter()
    spec = job_spec(args, seed, implants)
    prepared = prepare(spec)
    evaluator = Evaluator(spec, prepared, threads=args.threads)
    job, space = parse_spec(spec), evaluator.space
    stages = tuple(stages_for(job, evaluator.inputs.calibration.shape[0]))
    if not args.training_aware:
        stages = tuple(Stage(s.survivors, s.fitness_tokens, 0) for s in stages)
    plan = strategies.Plan(args.generations, args.offspring, stages)
    strategy = strategies.build("evolution", space, space.uniform(args.target), seed=seed, key=0, plan=plan)
    result = run(strategy, evaluator, job.data.seq_len)
    evaluator.load(result["genome"])
    held_out_kl, perplexity = evaluator.held_out_metrics()
    evaluator.unload()
    return {"fitness": result["fitness"], "held_out_kl": held_out_kl, "perplexity": perplexity,
            "evaluations": result["evaluations"], "implants": len(result["genome"].implants),
            "params": space.params(result["genome"]), "genome": result["genome"].to_dict(),
            "implant_levels": {"attn": space.attn_implant_levels, "mlp": space.mlp_implant_levels},
            "seconds": time.perf_counter() - started}


def single_swaps(args, seed: int) -> dict:
    """(kind, level) -> mean over layers of (KL pruned, KL implant), each layer moved alone to the level."""
    spec = job_spec(args, seed, list(ARMS["with implants"]))
    evaluator = Evaluator(spec, prepare(spec), threads=args.threads)
    space, base = evaluator.space, evaluator.space.uniform(args.target)

    def kl(genome: PruneGenome) -> float:
        reply = evaluator.evaluate({"candidate_id": genome.key(), "genome": genome.to_dict(), "target": args.target,
                                    "generation": 0, "stage": 0, "seed": seed, "sequences": 10**6,
                                    "train_tokens": 0, "final": False})
        return reply["kl"]

    out = {}
    for kind in ("attn", "mlp"):
        for level in space.implant_levels(kind):
            pairs = []
            for i in range(space.n_layers):
                levels = list(getattr(base, kind))
                levels[i] = level
                moved = PruneGenome(**{"attn": base.attn, "mlp": base.mlp, kind: tuple(levels)})
                pairs.append((kl(moved), kl(PruneGenome(moved.attn, moved.mlp, ((i, kind),)))))
            out[f"{kind} level {level}"] = [statistics.mean(p[0] for p in pairs), statistics.mean(p[1] for p in pairs)]
            print(f"{kind} level {level}: pruned KL {out[f'{kind} level {level}'][0]:.4f}, implant KL "
                  f"{out[f'{kind} level {level}'][1]:.4f} (mean over {len(pairs)} layers)", flush=True)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    swaps = single_swaps(args, args.seeds[0]) if args.swaps else None
    for seed in args.seeds:
        row = {"seed": seed}
        for arm, implants in ARMS.items():
            row[arm] = out = bench_arm(args, seed, implants)
            print(f"seed {seed} {arm:14s} evals {out['evaluations']:4d}  fitness KL {out['fitness']:.4f}  held-out KL "
                  f"{out['held_out_kl']:.4f}  ppl {out['perplexity']:.2f}  implants {out['implants']}  params "
                  f"{out['params']:,}  {out['seconds']:.0f} s", flush=True)
        results.append(row)
    for key in ("fitness", "held_out_kl"):
        ratios = [r["with implants"][key] / r["pruned levels"][key] for r in results]
        print(f"with / without implants, {key}: {statistics.mean(ratios):.3f} "
              f"({', '.join(f'{v:.3f}' for v in ratios)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "swaps": swaps}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
