"""What one candidate evaluation costs (light training on N tokens + KL on M tokens), sliced against masked.

For each model and target the evaluator scores the uniform genome the way a search does
(`Evaluator.evaluate`: build the sliced candidate, train it, KL, drop it). Beside it, timed interleaved in one
process with one torch thread:

- before: the path the evaluator took until sliced candidates: the database's masked weights put into the
  dense model, the full-size model trained with masked gradients, KL on it, every trainable weight put back;
- bare: training + KL of the already-sliced model (a standalone `slice_model` copy), nothing else; the
  evaluation's overhead over it is what building and putting back cost (goal: evaluation / bare <= 1.1);
- dense: training + KL of the dense model (goal at 50 %: evaluation / dense <= 0.65).

Evaluator start-up (model load, token pools, teacher outputs) is reported apart. Units come from a `magnitude`
database (cheap to build; candidates of mask criteria take the dense weights of the kept columns).

    DARWINFRONT_CACHE_DIR=/work/.cache-dev PYTHONPATH=. .venv/bin/python benchmarks/evaluation_cost.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from darwinfront.core.methods import parse_spec
from workers import finetune, fitness, levels, slicing
from workers.criteria._common import target_linear
from workers.evaluator import Evaluator
from workers.prepare import prepare

SOURCES = {"tiny-llama": "builtin:tiny-llama", "smollm2": "builtin:smollm2-135m"}


def job_spec(source: str, args) -> dict:
    """A training-aware job on a magnitude database whose pools hold exactly the benchmark's tokens."""
    return parse_spec({
        "model": {"source": source, "device": getattr(args, "device", "cpu"),
                  "dtype": getattr(args, "dtype", "float32")},
        "data": {"calibration_tokens": args.kl_tokens, "train_tokens": args.train_tokens, "eval_tokens": args.seq_len,
                 "database_tokens": args.seq_len, "seq_len": args.seq_len},
        "prune": {"criterion": "magnitude", "levels": args.levels, "train_batch_size": args.batch_size},
        "seed": 1,
    }).model_dump(mode="json")


def masked_evaluation(evaluator: Evaluator, genome, snapshot: finetune.Snapshot, train_tokens: int) -> float:
    """The evaluation before sliced candidates, in the dense model itself; returns its KL.

    Masked gradients keep the zeroed columns zero: AdamW moves a zero weight with a zero gradient nowhere (decay
    included), which `tests/test_candidate.py` checks.
    """
    model, db = evaluator.inputs.model, evaluator.database
    hooks = []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for kind, level in zip(levels.KINDS, (genome.attn[i], genome.mlp[i]), strict=True):
                if level:
                    weight = target_linear(layer, kind).weight
                    units = db.table.units(kind)
                    keep = torch.ones(units, weight.shape[1] // units)
                    keep[list(db.removed(i, kind, level))] = 0
                    keep = keep.reshape(1, -1)  # (1, in)
                    weight.mul_(keep)
                    hooks.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
    try:
        return bare_evaluation(model, evaluator, train_tokens)
    finally:
        for hook in hooks:
            hook.remove()
        snapshot.restore()


def bare_evaluation(model, evaluator: Evaluator, train_tokens: int) -> float:
    """Training + KL of `model` as it is, nothing else (the caller puts its weights back, untimed)."""
    batches = finetune.stage_batches(evaluator.inputs.training, train_tokens, 1, evaluator.train_settings.batch_size)
    finetune.finetune(model, batches, evaluator.train_settings)
    return fitness.kl(model, evaluator.inputs.calibration, evaluator.teacher)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(name: str, source: str, args) -> list[dict]:
    """Start an evaluator on `source`, then time every path per target, interleaved, `args.repeats` times."""
    spec = job_spec(source, args)
    startup, prepared = timed(lambda: prepare(spec))
    load, evaluator = timed(lambda: Evaluator(spec, prepared))
    print(f"{name}: prepare (database) {startup:.2f} s, evaluator start-up {load:.2f} s "
          f"(model load, pools, teacher outputs)", flush=True)
    dense_model = evaluator.inputs.model
    dense_snapshot = finetune.Snapshot([p for p in dense_model.parameters() if p.requires_grad])
    n_seq = evaluator.inputs.calibration.shape[0]
    rows = []
    for target in args.targets:
        genome = evaluator.space.uniform(target)
        sliced = slicing.slice_model(copy.deepcopy(dense_model), evaluator.layout(genome))
        sliced_snapshot = finetune.Snapshot([p for p in sliced.parameters() if p.requires_grad])
        request = {"candidate_id": "c", "genome": genome.to_dict(), "seed": 1, "sequences": n_seq,
                   "train_tokens": args.train_tokens}
        times = {"after": [], "before": [], "bare": [], "dense": []}
        kls = {"untrained": evaluator.evaluate({**request, "train_tokens": 0})["kl"]}
        for _ in range(args.repeats + 1):  # the first round warms up and is not counted
            seconds, reply = timed(lambda: evaluator.evaluate(request))  # noqa: B023
            assert "error" not in reply, reply
            times["after"].append(seconds)
            kls["after"] = reply["kl"]
            seconds, kls["before"] = timed(lambda: masked_evaluation(evaluator, genome, dense_snapshot,  # noqa: B023
                                                                     args.train_tokens))
            times["before"].append(seconds)
            seconds, kls["bare"] = timed(lambda: bare_evaluation(sliced, evaluator, args.train_tokens))  # noqa: B023
            sliced_snapshot.restore()
            times["bare"].append(seconds)
            seconds, _ = timed(lambda: bare_evaluation(dense_model, evaluator, args.train_tokens))
            dense_snapshot.restore()
            times["dense"].append(seconds)
        median = {k: statistics.median(v[1:]) for k, v in times.items()}
        rows.append({"model": name, "target": target, "params": evaluator.space.params(genome) /
                     evaluator.space.dense_params, **median, "kl_after": kls["after"], "kl_before": kls["before"],
                     "kl_bare": kls["bare"], "kl_untrained": kls["untrained"]})
        print(rows[-1], flush=True)
    return rows


def print_table(rows: list[dict], args) -> None:
    print(f"\none candidate: train {args.train_tokens} tokens (batch {args.batch_size} x {args.seq_len}) + KL on "
          f"{args.kl_tokens} tokens, 1 torch thread, median of {args.repeats}")
    head = (f"{'model':<11} {'target':>6} {'params':>6} {'before s':>9} {'after s':>8} {'bare s':>7} "
            f"{'dense s':>8} {'after/bare':>10} {'after/dense':>11} {'before/after':>12} {'|dKL| b-a':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<11} {r['target']:>6.2f} {r['params']:>6.3f} {r['before']:>9.3f} {r['after']:>8.3f} "
              f"{r['bare']:>7.3f} {r['dense']:>8.3f} {r['after'] / r['bare']:>10.3f} "
              f"{r['after'] / r['dense']:>11.3f} {r['before'] / r['after']:>12.2f} "
              f"{abs(r['kl_before'] - r['kl_after']):>10.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2"], choices=["tiny-llama", "smollm2"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--train-tokens", type=int, default=1024)
    parser.add_argument("--kl-tokens", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--levels", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        rows += measure(name, SOURCES[name], args)
    print_table(rows, args)


if __name__ == "__main__":
    main()
