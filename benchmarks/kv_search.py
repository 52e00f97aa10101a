"""KV precision search against the exhaustive front, on the reference model.

Profiles builtin:tiny-llama, prunes and groups its per-layer pair space (KVTuner), evaluates EVERY
configuration of the reduced space (the exhaustive front), then runs the job's NSGA-II search with a budget
of at most `--budget` evaluations, in the same process and on the same objective (KL with K/V quantized
inside the forward, average nominal bits). Prints both space sizes, the hypervolume ratio searched /
exhaustive (goal >= 0.98), and the searched configuration nearest 3.25 bits against uniform KV4 on KL.

    python benchmarks/kv_search.py [--budget 200] [--tokens 1024] [--seed 0] [--eps 1e-9]
"""

from __future__ import annotations

import argparse
import itertools
import time

import optuna
import torch

from darwinfront.core.methods import parse_spec
from search.kv_search import OBJECTIVES, KVSearch
from search.kv_space import KVSpace
from search.pareto import hypervolume_2d, non_dominated
from workers.kv_evaluator import KVEvaluator, prepare_kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eps", type=float, default=1e-9,
                        help="DBSCAN radius for grouping layers (tiny: every layer its own group)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    spec = parse_spec({
        "method": "kv_precision", "model": {"source": args.model, "device": "cpu"},
        "data": {"calibration_tokens": args.tokens, "seq_len": 128},
        "kv": {"mode": "kivi", "group_size": 16, "residual": 32, "trials": args.budget, "population": 16,
               "eps": args.eps},
        "seed": args.seed,
    }).model_dump(mode="json")
    prepared = prepare_kv(spec)
    space = KVSpace.from_dict(prepared["space"])
    evaluator = KVEvaluator(spec, prepared)
    print(f"model {args.model}: {prepared['num_layers']} layers; full pair space {prepared['full_space']:,}; "
          f"reduced space {space.size():,} in {len(space.groups)} groups {[list(g.layers) for g in space.groups]}")

    cache: dict[str, tuple[float, float]] = {}

    def score(layers: list[list[int]]) -> tuple[float, float]:
        key = str(layers)
        if key not in cache:
            reply = evaluator.evaluate({"candidate_id": key, "layers": layers})
            cache[key] = (reply["kl"], reply["bits"]["nominal"])
        return cache[key]

    start = time.perf_counter()
    exhaustive = [score(space.expand(list(choice)))
                  for choice in itertools.product(*(range(len(g.candidates)) for g in space.groups))]
    exhaustive_s = time.perf_counter() - start

    kv = parse_spec(spec).kv
    record = optuna.create_study(directions=["minimize"] * len(OBJECTIVES))
    search = KVSearch(space, record, sampler=kv.sampler, seed=args.seed, population=kv.population,
                      trials=args.budget, batch=1)  # one at a time: every proposal sees every result before it
    searched = []
    while not search.finished:
        for request in search.ask():
            values = score(request.layers)
            search.tell(request.candidate_id, values[0])
            searched.append(values)

    reference = (max(kl for kl, _ in exhaustive) * 1.1, 8.5)
    hv_all = hypervolume_2d([exhaustive[i] for i in non_dominated(exhaustive)], reference)
    hv_searched = hypervolume_2d([searched[i] for i in non_dominated(searched)], reference)
    kv4 = score([[4, 4]] * prepared["num_layers"])
    near = min((p for p in searched if p[1] <= 3.25 + 1e-9), key=lambda p: (abs(p[1] - 3.25), p[0]), default=None)
    print(f"exhaustive: {len(exhaustive)} configurations in {exhaustive_s:.0f} s; "
          f"front {len(non_dominated(exhaustive))} points")
    print(f"searched: {len(searched)} evaluations ({len(set(map(str, searched)))} distinct results)")
    print(f"hypervolume ratio searched / exhaustive: {hv_searched / hv_all:.4f} (goal >= 0.98)")
    print(f"uniform KV4: KL {kv4[0]:.5f} at 4.00 bits")
    if near is not None:
        print(f"searched config at {near[1]:.2f} bits: KL {near[0]:.5f} ({near[0] / kv4[0]:.2f}x KV4's KL)")


if __name__ == "__main__":
    main()
