"""Joint compression search against separate pruning and KV searches, at an equal total evaluation budget.

On one model and deployment point (batch, context, bf16), in one process and on one objective (KL to the dense
full-precision model with K/V quantized in the forward; memory = weights + packed KV cache, exact), it runs:

- joint: the `joint` job's search (`--strategy`, default evolution) over pruning levels and KV pairs, `--budget`
  evaluations;
- (a) separate: a pruning search (the same evolution, KV fixed at 16 bits, front by KL and parameters) and the
  `kv_precision` job's NSGA-II on the dense model, each with `s` evaluations, then every pair of the two fronts
  (thinned evenly so that the pairs fit the rest of the budget); split s = budget/6, /4 and /3, best reported;
- (b) pruning alone at 16-bit KV: the pruning search with the whole budget, front by KL and memory.

Prints the hypervolume of each arm's (KL, memory / dense memory) front over the reference point (`--ref-kl`,
1.0 = the dense model at 16-bit KV), the memory ranges where the joint front is strictly better than both, and
whether re-profiling the KV pairs of a pruned model changes KVTuner's pair lists (the question of recomputing
them per genome).

    python benchmarks/joint_search.py [--model builtin:tiny-llama] [--budget 120] [--batch 4] [--context 512]
        [--arms joint,a,b,recompute]
"""

from __future__ import annotations

import argparse
import time

import optuna
import torch

from darwinfront.core.methods import parse_spec
from search import joint_search
from search.joint_space import JointGenome, JointSpace
from search.kv_search import KVSearch
from search.kv_space import KVGroup, KVSpace, build_space, pareto_pairs
from search.pareto import hypervolume_2d, non_dominated
from workers import candidate
from workers.joint_evaluator import JointEvaluator, prepare_joint
from workers.kv.profile import profile_kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--budget", type=int, default=120, help="evaluations per arm, in total")
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024, help="fitness tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--criterion", default="wanda_sp")
    parser.add_argument("--strategy", default="evolution", choices=sorted(joint_search.STRATEGIES))
    parser.add_argument("--eps", type=float, default=0.05, help="DBSCAN radius grouping layers (the spec's)")
    parser.add_argument("--ref-kl", type=float, default=1.0, help="the reference point's KL (nats)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", default="joint,a,b,recompute",
                        help="what to run, comma-separated: joint, a, b, recompute (the pair-list check)")
    args = parser.parse_args()
    arms_asked = set(args.arms.split(","))
    if not arms_asked <= {"joint", "a", "b", "recompute"} or "joint" not in arms_asked:
        parser.error(f"--arms {args.arms!r}: joint and any of a, b, recompute")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    spec = parse_spec({
        "method": "joint", "model": {"source": args.model, "device": "cpu"},
        "data": {"calibration_tokens": args.tokens, "seq_len": args.seq_len, "train_tokens": 0,
                 "database_tokens": 4 * args.tokens, "eval_tokens": args.seq_len},
        "prune": {"criterion": args.criterion, "levels": args.levels, "targets": [0.25, 0.5]},
        "kv": {"mode": "kivi", "group_size": 16, "residual": 32, "profile_sequences": 4, "eps": args.eps},
        "deployment": {"batch_size": args.batch, "context": args.context, "dtype": "bfloat16"},
        "joint": {"evaluations": args.budget, "population": args.population}, "seed": args.seed,
    }).model_dump(mode="json")
    started = time.perf_counter()
    prepared = prepare_joint(spec)
    space = JointSpace.from_dict(prepared["space"])
    evaluator = JointEvaluator(spec, prepared)
    dense = space.memory(space.dense([0] * len(space.kv.groups)))
    print(f"model {args.model}: {space.levels.n_layers} layers, {space.levels.dense_params:,} parameters; "
          f"deployment batch {args.batch} x context {args.context} tokens, bf16: dense memory {dense:,} B "
          f"({space.weight_bytes(space.dense([0] * len(space.kv.groups))):,} weights); KV groups "
          f"{[list(g.layers) for g in space.kv.groups]}; prepared in {time.perf_counter() - started:.0f} s")

    kl_of: dict[str, float] = {}  # genome key -> KL, shared by the arms (each is charged its own evaluations)

    def score(genome: JointGenome) -> float:
        if genome.key() not in kl_of:
            reply = evaluator.evaluate({"candidate_id": genome.key(), "genome": genome.to_dict()})
            kl_of[genome.key()] = reply.get("kl", float("inf"))
        return kl_of[genome.key()]

    kv16 = JointSpace(space.levels, KVSpace((KVGroup(tuple(range(space.levels.n_layers)), ((16, 16),)),),
                                            space.levels.n_layers), space.cache, space.deployment)
    targets = spec["prune"]["targets"]

    def in_full(genome: JointGenome, choice: list[int]) -> JointGenome:
        return JointGenome(genome.attn, genome.mlp, tuple(choice))

    def run(strategy, full=lambda genome: genome) -> list[JointGenome]:
        """Run `strategy` to its end; `full` maps its genomes into the joint space, where they are scored."""
        asked = []
        while not strategy.finished:
            for request in strategy.ask():
                genome = full(request.genome)
                strategy.tell(request.candidate_id, score(genome))
                asked.append(genome)
        return asked

    def pruning(budget: int) -> list[JointGenome]:
        """The pruning search at 16-bit KV: its one-group genomes scored as every group at (16, 16) (choice 0)."""
        seeds = joint_search.seed_genomes(kv16, targets)
        return run(joint_search.build("evolution", kv16, seeds, seed=args.seed, budget=budget,
                                      round_size=args.population, kv_rate=0.0),
                   full=lambda genome: in_full(genome, [0] * len(space.kv.groups)))

    def kv_only(budget: int) -> list[list[int]]:
        dense_kv = KVSpace(tuple(KVGroup(g.layers, tuple(p for p in g.candidates if p != (16, 16)))
                                 for g in space.kv.groups), space.kv.num_layers)
        search = KVSearch(dense_kv, optuna.create_study(directions=["minimize"] * 2), seed=args.seed,
                          population=args.population, trials=budget, batch=args.population)
        zero = (0,) * space.levels.n_layers
        evaluated = []
        while not search.finished:
            for request in search.ask():
                choice = [space.kv.groups[g].candidates.index(tuple(request.layers[g_layers.layers[0]]))
                          for g, g_layers in enumerate(space.kv.groups)]
                genome = JointGenome(zero, zero, tuple(choice))
                search.tell(request.candidate_id, score(genome))
                evaluated.append(genome)
        return evaluated

    def front_of(genomes, memory=True) -> list[JointGenome]:
        unique = list({g.key(): g for g in genomes}.values())
        points = [(kl_of[g.key()], float(space.memory(g) if memory else space.levels.params(g.prune)))
                  for g in unique]
        return [unique[i] for i in non_dominated(points)]

    def points(genomes) -> list[tuple[float, float]]:
        return [(kl_of[g.key()], space.memory(g) / dense) for g in genomes]

    reference = (args.ref_kl, 1.0)
    arms: dict[str, list[JointGenome]] = {}
    t0 = time.perf_counter()
    seeds = joint_search.seed_genomes(space, targets)
    arms["joint"] = run(joint_search.build(args.strategy, space, seeds, seed=args.seed, budget=args.budget,
                                           round_size=args.population))
    t_joint = time.perf_counter() - t0
    print(f"  joint search done: {len(kl_of)} evaluations in {t_joint:.0f} s", flush=True)
    if "b" in arms_asked:
        arms["(b) pruning, 16-bit KV"] = pruning(args.budget)
    best_a = None
    for parts in (6, 4, 3) if "a" in arms_asked else ():
        s = args.budget // parts
        prune_front = front_of(pruning(s), memory=False)
        kv_genomes = kv_only(s)
        kv_front = front_of(kv_genomes)
        room = args.budget - 2 * s
        n_p, n_k = _thin_sizes(len(prune_front), len(kv_front), room)
        pairs = [in_full(p, list(k.kv)) for p in _even(sorted(prune_front, key=space.memory), n_p)
                 for k in _even(sorted(kv_front, key=space.memory), n_k)]
        for genome in pairs:
            score(genome)
        evaluated = prune_front + kv_genomes + pairs
        hv = hypervolume_2d(points(front_of(evaluated)), reference)
        print(f"  (a) split {s}+{s} evaluations, fronts {len(prune_front)} x {len(kv_front)} thinned to "
              f"{n_p} x {n_k} = {len(pairs)} pairs ({2 * s + len(pairs)} evaluations in all): hypervolume {hv:.4f}",
              flush=True)
        if best_a is None or hv > best_a[0]:
            best_a = (hv, evaluated, s)
    if best_a is not None:
        arms[f"(a) separate fronts, every pair (split {best_a[2]}+{best_a[2]})"] = best_a[1]

    fronts = {name: sorted(front_of(genomes), key=space.memory) for name, genomes in arms.items()}
    hvs = {name: hypervolume_2d(points(front), reference) for name, front in fronts.items()}
    print(f"\nreference point: KL {args.ref_kl} nats, memory 1.0 x dense ({dense:,} B); budget {args.budget} "
          f"evaluations per arm; joint search {t_joint:.0f} s (machine shared and busy)")
    for name, front in fronts.items():
        print(f"  {name:48s} hypervolume {hvs[name]:.4f}   front {len(front)} points, memory "
              f"{min(space.memory(g) for g in front) / dense:.3f}..{max(space.memory(g) for g in front) / dense:.3f}")
    others = [n for n in hvs if n != "joint"]
    if others:
        goal = hvs["joint"] >= max(hvs[n] for n in others)
        print(f"  joint / best other: {hvs['joint'] / max(hvs[n] for n in others):.3f} "
              f"(goal >= 1: {'met' if goal else 'MISSED'})")
        print(f"  memory ranges (x dense) where the joint front is strictly better than both: "
              f"{_better_ranges(fronts, kl_of, space, dense)}")
    if "recompute" in arms_asked:
        _recompute_check(evaluator, space, spec, targets)


def _thin_sizes(n_p: int, n_k: int, room: int) -> tuple[int, int]:
    """The largest n_p' x n_k' <= room with n_p' <= n_p, n_k' <= n_k, as balanced as the fronts allow."""
    best = (1, 1)
    for a in range(1, n_p + 1):
        b = min(n_k, room // a)
        if b >= 1 and a * b > best[0] * best[1]:
            best = (a, b)
    return best


def _even(items: list, n: int) -> list:
    if n >= len(items):
        return items
    return [items[round(i * (len(items) - 1) / max(1, n - 1))] for i in range(n)]


def _best_kl(front, kl_of, space, budget: float) -> float:
    return min((kl_of[g.key()] for g in front if space.memory(g) <= budget), default=float("inf"))


def _better_ranges(fronts, kl_of, space, dense) -> str:
    """Where, over a grid of memory budgets, the joint front's best KL within the budget beats every other arm's."""
    grid = [i / 200 for i in range(1, 201)]
    joint = fronts["joint"]
    better = [all(_best_kl(joint, kl_of, space, m * dense) < _best_kl(f, kl_of, space, m * dense)
                  for n, f in fronts.items() if n != "joint") and _best_kl(joint, kl_of, space, m * dense) < 1e9
              for m in grid]
    ranges, start, previous = [], None, grid[0]
    for m, b in zip(grid + [None], better + [False], strict=True):
        if b and start is None:
            start = m
        elif not b and start is not None:
            ranges.append(f"{start:.3f}-{previous:.3f}")
            start = None
        previous = m
    share = sum(better) / len(grid)
    return (", ".join(ranges) or "none") + f" ({share:.0%} of the 0..1 grid)"


def _recompute_check(evaluator: JointEvaluator, space: JointSpace, spec: dict, targets) -> None:
    """Re-profile the uniformly cut model and compare each layer's KVTuner pair list with the dense model's."""
    kv = spec["kv"]
    dense_table = profile_kv(evaluator.inputs.model, evaluator.inputs.calibration[:4], mode=kv["mode"],
                             group_size=kv["group_size"], bits=(2, 4, 8))
    for target in targets:
        genome = space.levels.uniform(target)
        model = candidate.build(evaluator.inputs.model, evaluator.database, genome, weights=evaluator.weights)
        cut = profile_kv(model, evaluator.inputs.calibration[:4], mode=kv["mode"], group_size=kv["group_size"],
                         bits=(2, 4, 8))
        same, changed, shift = 0, 0, []
        for layer, (d, c) in enumerate(zip(dense_table["layers"], cut["layers"], strict=True)):
            if space.kept_heads(genome.attn[layer]) == 0 or genome.attn[layer] == 0:
                continue  # attention gone, or its units unchanged
            lists = [tuple(pareto_pairs([(p["k"], p["v"], p["e_o"]) for p in t["pairs"]])) for t in (d, c)]
            same += lists[0] == lists[1]
            changed += lists[0] != lists[1]
            shift += [abs(q["e_o"] - p["e_o"]) / max(p["e_o"], 1e-12) for p, q in zip(d["pairs"], c["pairs"],
                                                                                    strict=True)]
        groups = len(build_space(cut, eps=kv.get("eps", 0.05)).groups)
        mean = sum(shift) / len(shift) if shift else 0.0
        print(f"  re-profiled at uniform cut {target}: of {same + changed} layers whose attention units changed, "
              f"{changed} get another Pareto pair list; e_o moves by {mean:.1%} on average; "
              f"{groups} groups (dense {len(space.kv.groups)})")
        del model


if __name__ == "__main__":
    main()
