"""Evaluation throughput of one prune job's search with 1, 2 (and 4) Ray evaluators, and what limits it.

The search runs as a job does (`PruneJob._generation`'s loop: the staged (1+λ) evolution asks a stage, the pool
scores it in completion order, the evolution is told), without Redis or Optuna, on a local Ray whose CPUs the pool
splits between its evaluators (torch threads = CPUs / evaluators), as a job on this machine would. Reported per
pool size, side by side in one run: evaluations per second and its ratio to one evaluator; the driver's own time
per evaluation (ask, tell, dispatch: wall time less the time spent waiting for replies); and idle evaluator time at
the generation's stage barriers: a stage waits for its slowest candidate before the next stage's candidates are
known, so evaluators sit idle when a stage has fewer candidates than evaluators or its candidates finish unevenly.

    PYTHONPATH=. DARWINFRONT_CACHE_DIR=/tmp/dfcache .venv/bin/python benchmarks/scaling.py --evaluators 1 2
"""

from __future__ import annotations

import argparse
import time

import ray

from darwinfront.core.methods import parse_spec
from search.evolution import Evolution
from search.genome import LevelSpace
from workers.pool import EvaluatorPool, init_ray
from workers.prepare import prepare
from workers.prune_job import _request_dict, stages_for


def job_spec(args) -> dict:
    """A prune job at 50 % whose stage training tokens are the defaults divided by `--train-divisor`."""
    spec = {
        "model": {"source": args.model, "device": "cpu"},
        "data": {"calibration_tokens": args.calibration_tokens, "train_tokens": 16384, "database_tokens": 2048},
        "prune": {"targets": [0.5], "criterion": args.criterion},
        "search": {"generations": args.generations, "offspring": args.offspring},
        "seed": 0,
    }
    defaults = parse_spec(spec).search.train_tokens
    spec["search"]["train_tokens"] = [max(128, t // args.train_divisor) for t in defaults]
    return parse_spec(spec).model_dump(mode="json")


def run_search(spec: dict, prepared: dict, size: int) -> dict:
    """One target's search on a pool of `size` evaluators; wall, waiting and per-stage busy figures."""
    job = parse_spec(spec)
    space = LevelSpace.from_dict(prepared["space"])
    stages = stages_for(job, prepared["calibration_sequences"])
    evolution = Evolution(space, space.uniform(0.5), seed=0, key=0, offspring=job.search.offspring, stages=stages,
                          generations=job.search.generations)
    pool = EvaluatorPool(spec, prepared, size=size)
    pool.wait_ready()
    started, waiting, evaluations, busy, capacity = time.perf_counter(), 0.0, 0, 0.0, 0.0
    per_generation: dict[int, list[float]] = {}  # generation -> [busy evaluator s, evaluator s held]
    try:
        while not evolution.finished:
            generation = evolution.generation
            batch = evolution.ask()
            requests = [_request_dict(r, 0.5, job.data.seq_len) for r in batch]
            stage_start = time.perf_counter()
            replies = pool.map_unordered(requests)
            while True:
                before = time.perf_counter()
                try:
                    request, reply = next(replies)
                except StopIteration:
                    waiting += time.perf_counter() - before
                    break
                waiting += time.perf_counter() - before
                evolution.tell(request["candidate_id"], reply.get("kl"), reply.get("error"))
                busy += reply["seconds"]
                per_generation.setdefault(generation, [0.0, 0.0])[0] += reply["seconds"]
                evaluations += 1
            capacity += (time.perf_counter() - stage_start) * size
            per_generation[generation][1] += (time.perf_counter() - stage_start) * size
    finally:
        pool.shutdown()
    wall = time.perf_counter() - started
    return {"evaluators": size, "evaluations": evaluations, "wall_s": wall, "per_second": evaluations / wall,
            "driver_ms_per_eval": 1000 * (wall - waiting) / evaluations, "idle": 1 - busy / capacity,
            "idle_per_generation": [1 - b / c for _, (b, c) in sorted(per_generation.items())]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--criterion", default="magnitude")
    p.add_argument("--evaluators", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpus", type=int, default=0,
                   help="CPUs Ray offers (default: the largest --evaluators); the pool splits them between evaluators")
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--offspring", type=int, default=8)
    p.add_argument("--calibration-tokens", type=int, default=1024)
    p.add_argument("--train-divisor", type=int, default=8, help="divides the stage training tokens 2K..32K")
    args = p.parse_args()
    init_ray(num_cpus=args.cpus or max(args.evaluators))
    spec = job_spec(args)
    prepared = prepare(spec, threads=1)
    rows = [run_search(spec, prepared, size) for size in args.evaluators]
    base = rows[0]["per_second"]
    print(f"{args.model}, {args.criterion} database, {args.generations} generations of {args.offspring} offspring, "
          f"{ray.cluster_resources().get('CPU', 0):.0f} CPUs split between the evaluators")
    print("evaluators  evaluations  wall s  evals/s  ratio  driver ms/eval  idle at barriers  idle per generation")
    for r in rows:
        generations = " ".join(f"{100 * idle:.1f}" for idle in r["idle_per_generation"])
        print(f"{r['evaluators']:>10}  {r['evaluations']:>11}  {r['wall_s']:6.1f}  {r['per_second']:7.2f}  "
              f"{r['per_second'] / base:5.2f}  {r['driver_ms_per_eval']:14.1f}  {100 * r['idle']:15.1f} %  "
              f"{generations} %")
    ray.shutdown()


if __name__ == "__main__":
    main()
