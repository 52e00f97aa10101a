"""Benchmark: DarwinLM-style search against its baselines at equal evaluation budgets.

On `builtin:tiny-llama` at 50 % of the prunable parameters, for each seed, five arms spend the same number of
candidate evaluations over the same level space and database:

- uniform: the uniform levels (one evaluation);
- random: random search at the budget's level sums;
- nsga2: Optuna NSGA-II with repair to the budget;
- evopress: the staged (1+λ) evolution scored as cut;
- darwinlm: the same evolution with training-aware selection;
- evopress_protect: the evopress arm with HierarchicalPrune's early-layer protection prior in the mutation
  (`--early-layer-prior`);
- pagcp, pagcp_reverse: PAGCP's greedy pass under a shared KL budget, layers first to last / last to first;
- nirvana: NIRVANA's global ranking of the criterion's unit scores, γ searched over its grid;
- depth: HierarchicalPrune's whole-block removal (later blocks first unless the ablations disagree).

`--arms` picks a subset (default: all). Each arm is a strategy of the registry (`search.strategies`) that a job's
`search.strategy` names.

Baselines score every candidate on the whole fitness pool (the evolution's last stage, as cut). Each arm's winner is
then measured on held-out text one-shot (database weights) and after the same post-training for every arm
(darwinlm.md §8.9): held-out KL to the dense model and perplexity. A longer run of the darwinlm arm with
`--reference-scale` times the generations gives the "best KL a 10x budget finds". Overhead is the wall time per
evaluation over the bare forward + training time measured inside it (in process: no Ray, no Redis).

Each arm's search is also measured (`search_s`, `peak_rss_mib`, on CUDA `cuda_peak_mib`): the wall seconds of
its ask/tell loop with all its evaluations, and the peak memory it adds, sampled on a thread as the process's
resident set above its size at the arm's start. Neither counts the level database build and nirvana's unit scores
(shared, before the arms) nor the winner's post-training and held-out metrics (identical for every arm, after).

    DARWINFRONT_CACHE_DIR=/tmp/dfcache .venv/bin/python benchmarks/prune_search.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import statistics
import threading
import time

import torch

from darwinfront.core.methods import parse_spec
from darwinfront.core.spec import SearchSpec
from search import strategies
from search.seeding import derive_seed
from search.strategy import Stage
from workers.evaluator import Evaluator
from workers.job_inputs import unit_saliency
from workers.prepare import prepare
from workers.prune_job import stages_for

ARMS = ("uniform", "random", "nsga2", "evopress", "darwinlm", "evopress_protect", "pagcp", "pagcp_reverse", "nirvana",
        "depth")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--criterion", default="obs")
    p.add_argument("--attention-unit", choices=("kv_group", "q_head"), default="kv_group",
                   help="attention level steps: KV groups, or query heads with K/V kept")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--generations", type=int, default=6, help="evolution generations (the budget follows)")
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--train-scale", type=float, default=0.25, help="scales the stage training tokens 2K..32K")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--train-loss", choices=("ce", "kd"), default="ce", help="light- and post-training loss")
    p.add_argument("--post-train-tokens", type=int, default=32768, help="identical post-training of every winner")
    p.add_argument("--reference-scale", type=int, default=10, help="generations multiple of the reference run")
    p.add_argument("--reference-seeds", type=int, default=0, help="seeds that also run the reference (first ones)")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--selection", choices=("first", "kl"), default="first",
                   help="data.selection: the database's sequences first in the documents, or NIRVANA's KL rule")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run (default: all)")
    p.add_argument("--early-layer-prior", type=float, default=2.0, help="strength of the evopress_protect arm")
    p.add_argument("--json", default=None, help="write the full results here")
    return p.parse_args(argv)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def measured(device: str, interval_s: float = 0.01):
    """Wall seconds and peak memory the block adds, into the yielded dict.

    `peak_rss_mib`: the largest resident set sampled every `interval_s` (and at the end) minus the one at the
    start; a spike shorter than the interval can be missed. Freed heap is handed back to the system first, so an
    arm does not reuse, unseen, the memory an earlier arm's post-training left in the allocator. On CUDA,
    `cuda_peak_mib` is torch's peak allocation during the block (with what was resident at the start,
    `cuda_start_mib`).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    cuda = device.startswith("cuda")
    out, start, peak, done = {}, _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["cuda_start_mib"] = torch.cuda.memory_allocated() / 2**20
    sampler.start()
    started = time.perf_counter()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
        out["search_s"] = time.perf_counter() - started
        done.set()
        sampler.join()
        out["peak_rss_mib"] = (max(peak[0], _rss_bytes()) - start) / 2**20
        if cuda:
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20


def job_spec(args, seed: int) -> dict:
    stages = SearchSpec.model_validate({"offspring": args.offspring}).train_tokens  # the defaults, per stage
    train = [max(128, int(t * args.train_scale)) for t in stages]
    return parse_spec({
        "model": {"source": args.model, "device": args.device, "dtype": args.dtype},
        "data": {"calibration_tokens": args.calibration_tokens, "eval_tokens": args.eval_tokens,
                 "train_tokens": max(65536, args.post_train_tokens), "selection": args.selection},
        "prune": {"targets": [args.target], "criterion": args.criterion, "train_lr": args.lr,
                  "train_loss": args.train_loss, "attention_unit": args.attention_unit},
        "search": {"generations": args.generations, "offspring": args.offspring, "train_tokens": train},
        "seed": seed,
    }).model_dump(mode="json")


def run(strategy, evaluator: Evaluator, seq_len: int) -> dict:
    """Drive an ask/tell strategy with in-process evaluations; time them."""
    wall, compute, evaluations = 0.0, 0.0, 0
    while not strategy.finished:
        batch = strategy.ask(limit=16)  # NSGA-II learns a population at a time
        if not batch:
            raise RuntimeError(f"{type(strategy).__name__} asked for nothing but is not finished")
        for request in batch:
            started = time.perf_counter()
            reply = evaluator.evaluate({
                "candidate_id": request.candidate_id, "genome": request.genome.to_dict(), "target": 0.0,
                "generation": request.generation, "stage": request.stage, "seed": request.seed,
                "sequences": max(1, math.ceil(request.stage_spec.fitness_tokens / seq_len)),
                "train_tokens": request.stage_spec.train_tokens, "final": False,
            })
            strategy.tell(request.candidate_id, reply.get("kl"), reply.get("error"))
            wall += time.perf_counter() - started
            compute += reply.get("compute_seconds", 0.0)
            evaluations += 1
    return {"genome": strategy.best, "fitness": strategy.best_fitness, "evaluations": evaluations,
            "wall_s": wall, "compute_s": compute}


def winner_metrics(evaluator: Evaluator, genome, post_tokens: int, seed: int) -> dict:
    """Held-out KL and perplexity of `genome` one-shot and after post-training (then the model is put back)."""
    evaluator.load(genome)
    kl, ppl = evaluator.held_out_metrics()
    evaluator.load(genome, train_tokens=post_tokens, seed=derive_seed(seed, "post-train"))
    post_kl, post_ppl = evaluator.held_out_metrics()
    evaluator.unload()
    return {"held_out_kl": kl, "perplexity": ppl, "post_kl": post_kl, "post_perplexity": post_ppl,
            "genome": genome.to_dict(), "params": evaluator.space.params(genome)}


def arms(args, spec: dict, evaluator: Evaluator, seed: int) -> dict:
    """Each arm as a maker of its registered strategy: (strategy name, stages, generations)."""
    job = parse_spec(spec)
    space = evaluator.space
    trained = tuple(stages_for(job, evaluator.inputs.calibration.shape[0]))
    as_cut = tuple(Stage(s.survivors, s.fitness_tokens, 0) for s in trained)
    settings = {
        "uniform": ("uniform", as_cut, args.generations),
        "random": ("random", as_cut, args.generations),
        "nsga2": ("nsga2", as_cut, args.generations),
        "evopress": ("evolution", as_cut, args.generations),
        "darwinlm": ("evolution", trained, args.generations),
        "reference": ("evolution", trained, args.generations * args.reference_scale),
        "evopress_protect": ("evolution", as_cut, args.generations, {"early_layer_prior": args.early_layer_prior}),
        "pagcp": ("pagcp", as_cut, args.generations),
        "pagcp_reverse": ("pagcp", as_cut, args.generations, {"layer_order": "reverse"}),
        "nirvana": ("nirvana", as_cut, args.generations),
        "depth": ("depth", as_cut, args.generations),
    }
    saliency = None
    if "nirvana" in args.arms:
        saliency = unit_saliency(evaluator.inputs, evaluator.database)

    def maker(name, stages, generations, options=None):
        plan = strategies.Plan(generations, args.offspring, stages, **(options or {}))
        return lambda: strategies.build(name, space, space.uniform(args.target), seed=seed, key=0, plan=plan,
                                        saliency=saliency)

    return {arm: maker(*arm_settings) for arm, arm_settings in settings.items()}


def bench_seed(args, seed: int) -> dict:
    spec = job_spec(args, seed)
    prepared = prepare(spec)
    evaluator = Evaluator(spec, prepared, threads=args.threads)
    seq_len = parse_spec(spec).data.seq_len
    makers = arms(args, spec, evaluator, seed)
    names = list(args.arms) + (["reference"] if seed in args.seeds[: args.reference_seeds] else [])
    out = {"seed": seed, "database": prepared["database"], "dense_perplexity": prepared["dense"]["perplexity"]}
    for arm in names:
        started = time.perf_counter()
        with measured(args.device) as cost:
            result = run(makers[arm](), evaluator, seq_len)
        metrics = winner_metrics(evaluator, result["genome"], args.post_train_tokens, seed)
        out[arm] = {**metrics, "fitness": result["fitness"], "evaluations": result["evaluations"],
                    "overhead": result["wall_s"] / max(result["compute_s"], 1e-12), **cost,
                    "seconds": time.perf_counter() - started}
        print(f"seed {seed} {arm:9s} evals {result['evaluations']:5d}  params {metrics['params']:,}"
              f"  held-out KL {metrics['held_out_kl']:.4f}"
              f" -> post {metrics['post_kl']:.4f}  ppl {metrics['perplexity']:.2f} -> {metrics['post_perplexity']:.2f}"
              f"  overhead {out[arm]['overhead']:.3f}  search {cost['search_s']:.1f} s"
              f" +{cost['peak_rss_mib']:.0f} MiB RSS  arm {out[arm]['seconds']:.0f} s", flush=True)
    return out


def summarize(results: list[dict]) -> dict:
    """Mean and std over seeds per arm, and the goal ratios."""

    def stat(arm: str, key: str) -> tuple[float, float]:
        values = [r[arm][key] for r in results if arm in r]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    keys = ("held_out_kl", "post_kl", "perplexity", "post_perplexity", "evaluations", "overhead", "seconds",
            "search_s", "peak_rss_mib", "cuda_peak_mib")
    table = {arm: {k: stat(arm, k) for k in keys if all(k in r[arm] for r in results if arm in r)}
             for arm in [*ARMS, "reference"] if any(arm in r for r in results)}
    ratios = {}
    for key in ("held_out_kl", "post_kl") if all("darwinlm" in r and "uniform" in r for r in results) else ():
        ratios[f"darwinlm_over_uniform_{key}"] = [r["darwinlm"][key] / r["uniform"][key] for r in results]
        ratios[f"darwinlm_over_reference_{key}"] = [
            r["darwinlm"][key] / r["reference"][key] for r in results if "reference" in r
        ]
    return {"table": table, "ratios": ratios}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = [bench_seed(args, seed) for seed in args.seeds]
    summary = summarize(results)
    cuda = args.device.startswith("cuda")
    print("\nsearch s and +RSS MiB: the arm's ask/tell loop with its evaluations (no database build, no post-training)")
    print("arm               evals   held-out KL        post-trained KL    ppl        post ppl   overhead  search s"
          "  +RSS MiB" + ("  CUDA peak MiB" if cuda else ""))
    for arm, row in summary["table"].items():
        cells = [f"{row[k][0]:.4f}±{row[k][1]:.4f}" for k in ("held_out_kl", "post_kl")]
        cells += [f"{row[k][0]:.2f}" for k in ("perplexity", "post_perplexity")]
        print(f"{arm:16s} {row['evaluations'][0]:6.0f}   {cells[0]}   {cells[1]}   {cells[2]:9s}  {cells[3]:9s}"
              f"  {row['overhead'][0]:.3f}    {row['search_s'][0]:8.1f}  {row['peak_rss_mib'][0]:8.0f}"
              + (f"  {row['cuda_peak_mib'][0]:13.0f}" if cuda else ""))
    for name, values in summary["ratios"].items():
        print(f"{name}: {', '.join(f'{v:.3f}' for v in values)}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": summary}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
