"""Saliency criteria on the trained reference model: cut the lowest-scored 25% of units per layer, measure KL.

For every registered criterion: score the units on calibration tokens (timed), remove the lowest `--fraction` of
the attention units (KV groups, or query heads with `--attention-unit q_head`), of the MLP channels, or of both,
in every layer (as masks, `workers.slicing.masked`), and report
KL(p_dense ‖ p_pruned) per token on held-out evaluation tokens. The criteria that need a forward pass per unit
or probe (ablation, gate_spsa) see only the first `--slow-tokens` calibration tokens. Two compensated variants
are added: `obs+update` (OBS-updated o_proj / down_proj weights from `obs_levels`) and `flap+bias` (FLAP's mean
compensation). Data-aware criteria should beat `random` and `magnitude`; the last columns give Spearman's ρ
against `ablation` (the exact single-unit ΔKL), averaged over layers. "peak MiB" is the memory scoring added above
what was held when it began: CUDA's peak allocation on a GPU; on the CPU the sampled resident set, which a later
criterion of the same run may understate (it reuses pages an earlier one freed), so compare memory across
separate runs of one criterion each (`--criteria taylor`, `--criteria mini_llm`).

    .venv/bin/python -m benchmarks.criteria                      # builtin:tiny-llama, all criteria
    .venv/bin/python -m benchmarks.criteria --criteria wanda_sp,flap --fraction 0.5
    .venv/bin/python -m benchmarks.criteria --attention-unit q_head  # query heads, K/V kept
    .venv/bin/python -m benchmarks.criteria --criteria mini_llm,hessian_trace --options mini_llm.probes=8
    .venv/bin/python -m benchmarks.criteria --families all     # one column per family, random weights
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.database_build import peak_rss
from search.genome import PruneGenome
from workers import criteria, data, fitness, levels, modeling, slicing
from workers.criteria.base import UnitScores
from workers.criteria.flap import Flap
from workers.criteria.obs import obs_levels

CUTS = ("attn", "mlp", "both")
SLOW = ("ablation", "gate_spsa", "mini_llm")  # forward passes per unit or probe and layer: on --slow-tokens
MiB = 2**20


@dataclass(frozen=True)
class Row:
    name: str
    seconds: float
    kl: dict[str, float]
    rho: dict[str, float]
    peak_mib: float = float("nan")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """The memory the block adds at its peak, in MiB (CUDA peak allocation, else the sampled resident set)."""
    out = [float("nan")]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out[0] = (torch.cuda.max_memory_allocated(device) - start) / MiB
        return
    with peak_rss() as peak:
        start = peak[0]
        yield out
    out[0] = (peak[0] - start) / MiB


def parse_options(text: str) -> dict[str, dict]:
    """`name.key=value,...` -> name -> {key: int or float} (criterion constructor arguments)."""
    out: dict[str, dict] = {}
    for item in filter(None, text.split(",")):
        name, _, rest = item.partition(".")
        key, _, value = rest.partition("=")
        if not (name and key and value):
            raise SystemExit(f"--options: expected name.key=value, got {item!r}")
        out.setdefault(name, {})[key] = float(value) if any(c in value for c in ".e") else int(value)
    return out


def removal_genome(model: nn.Module, fraction: float, cut: str, unit: str = "kv_group") -> PruneGenome:
    """Every layer drops round(fraction · units) attention units (cut attn/both) and MLP units (channels, or
    experts; cut mlp/both)."""
    d = slicing.dims(model)
    attn = round(fraction * d.attn_units(unit)) if cut in ("attn", "both") else 0
    mlp = round(fraction * d.mlp_units) if cut in ("mlp", "both") else 0
    return PruneGenome(attn=(attn,) * d.n_layers, mlp=(mlp,) * d.n_layers)


def unit_table(model: nn.Module, unit: str) -> levels.LevelTable:
    """One attention unit and one MLP unit (channel or expert) per level step: a level is a unit count."""
    d = slicing.dims(model)
    return levels.LevelTable(d.attn_units(unit), 1, d.mlp_units, 1, unit, d.mlp_unit)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (ties broken by index; scores here are continuous)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def mean_rho(scores: UnitScores, oracle: UnitScores | None, kind: str) -> float:
    if oracle is None:
        return float("nan")
    return sum(
        spearman(getattr(s, kind), getattr(o, kind)) for s, o in zip(scores.layers, oracle.layers, strict=True)
    ) / len(scores)


def held_out_kl(model: nn.Module, scores: UnitScores, fraction: float, held: torch.Tensor, dense, bs: int,
                unit: str) -> dict:
    """KL to dense on held-out tokens after masking the lowest-scored units, per cut."""
    out = {}
    for cut in CUTS:
        genome = removal_genome(model, fraction, cut, unit)
        layout = levels.layout(genome, levels.removal_orders(scores), unit_table(model, unit))
        with slicing.masked(model, layout):
            out[cut] = fitness.kl(model, held, dense, batch_size=bs)
    return out


def obs_updated_kl(model, calib, fraction, held, dense, bs, unit) -> tuple[float, dict]:
    """KL after cutting OBS's first units and loading its updated weights (compensated OBS)."""
    started = time.perf_counter()
    both = removal_genome(model, fraction, "both", unit)
    levels = {"attn": [both.attn[0]], "mlp": [both.mlp[0]]}
    res = obs_levels(model, calib, levels, batch_size=bs, attention_unit=unit)
    seconds = time.perf_counter() - started
    out = {}
    for cut in CUTS:
        kinds = ("attn", "mlp") if cut == "both" else (cut,)
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            for layer, lv in zip(pruned.model.layers, res, strict=True):
                for kind in kinds:
                    lin = layer.self_attn.o_proj if kind == "attn" else layer.mlp.down_proj
                    lin.weight.copy_(lv[kind].weights[levels[kind][0]])
        out[cut] = fitness.kl(pruned, held, dense, batch_size=bs)
    return seconds, out


def flap_bias_kl(model, calib, fraction, held, dense, bs, unit) -> tuple[float, dict]:
    """KL after cutting FLAP's lowest units and adding its bias compensation (what its level database stores)."""
    started = time.perf_counter()
    both = removal_genome(model, fraction, "both", unit)
    counts = {"attn": [both.attn[0]], "mlp": [both.mlp[0]]}
    flap = Flap(batch_size=bs, attention_unit=unit, bias_compensation=True)
    found = dict(flap.level_weights(model, calib, counts))
    seconds = time.perf_counter() - started
    orders = [{kind: found[i][kind].order.tolist() for kind in counts} for i in range(len(found))]
    out = {}
    for cut in CUTS:
        genome = removal_genome(model, fraction, cut, unit)
        pruned = slicing.slice_model(copy.deepcopy(model), levels.layout(genome, orders, unit_table(model, unit)))
        for i, layer in enumerate(pruned.model.layers):
            for kind, removed in (("attn", genome.attn[i]), ("mlp", genome.mlp[i])):
                if removed:
                    slicing.add_output_shift(layer, kind, found[i][kind].shifts[removed])
        out[cut] = fitness.kl(pruned, held, dense, batch_size=bs)
    return seconds, out


MOE_EXPERTS = 8
MOE_SIZES = {"MixtralForCausalLM": ("intermediate_size", "num_local_experts"),  # (expert width, expert count)
             "Qwen3MoeForCausalLM": ("moe_intermediate_size", "num_experts"),
             "OlmoeForCausalLM": ("intermediate_size", "num_experts")}


def family_model(model: nn.Module, architecture: str, seed: int) -> nn.Module:
    """A randomly initialised model of `architecture` (a registered family) at `model`'s sizes and vocabulary,
    with the family's own defaults for everything else (Gemma's norms, soft-capping and sliding layers)."""
    import transformers

    config = model.config
    name = architecture.removesuffix("ForCausalLM")
    config_class = getattr(transformers, "Gemma3TextConfig" if name == "Gemma3" else f"{name}Config")
    sizes = {key: getattr(config, key) for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads",
                                                   "intermediate_size", "max_position_embeddings")}
    sizes["head_dim"] = config.hidden_size // config.num_attention_heads
    if architecture in MOE_SIZES:  # the same MLP channels as 8 experts, 2 per token
        width_key, count_key = MOE_SIZES[architecture]
        sizes[width_key] = sizes.pop("intermediate_size") // MOE_EXPERTS
        sizes.update({count_key: MOE_EXPERTS, "num_experts_per_tok": 2})
    family_config = config_class(**sizes)
    if (family_config.pad_token_id or 0) >= config.vocab_size:  # Phi-3's default pad id is past a small vocabulary
        family_config.pad_token_id = None
    torch.manual_seed(seed)
    built = getattr(transformers, architecture)(family_config)
    return built.to(dtype=next(model.parameters()).dtype, device=next(model.parameters()).device).eval()


def run(args: argparse.Namespace, architecture: str | None = None) -> list[Row]:
    model, tokenizer = modeling.load_model(args.model, dtype=args.dtype, device=args.device)
    if architecture is not None:
        model = family_model(model, architecture, args.seed)
    texts = data.load_texts(args.data)
    pools = {
        split: data.token_sequences(tokenizer, texts, n_tokens=n, seq_len=args.seq_len, split=split, seed=args.seed)
        for split, n in (("calibration", args.calibration_tokens), ("evaluation", args.eval_tokens))
    }
    device = next(model.parameters()).device
    calib, held = pools["calibration"].to(device), pools["evaluation"].to(device)
    dense = fitness.Teacher.of(model, held, batch_size=args.batch_size)
    names = args.criteria.split(",") if args.criteria else criteria.names()
    timed: dict[str, tuple[float, UnitScores]] = {}
    peaks: dict[str, float] = {}
    extra = parse_options(args.options)
    for name in sorted(names, key=lambda n: n != "ablation"):  # the oracle first, for ρ
        options = {"attention_unit": args.attention_unit}
        if name == "random":
            options["seed"] = args.seed
        if name != "magnitude" and name != "random":
            options["batch_size"] = args.batch_size
        options.update(extra.get(name, {}))
        tokens = calib[: max(1, args.slow_tokens // args.seq_len)] if name in SLOW else calib
        with peak_memory(device) as peak:
            started = time.perf_counter()
            scores = criteria.get(name, **options).score(model, tokens)
            timed[name] = (time.perf_counter() - started, scores)
        peaks[name] = peak[0]
        print(f"  scored {name} on {tokens.numel()} tokens in {timed[name][0]:.1f} s, peak +{peak[0]:.0f} MiB",
              flush=True)
    oracle = timed.get("ablation", (0.0, None))[1]
    rows = [
        Row(
            name,
            sec,
            held_out_kl(model, scores, args.fraction, held, dense, args.batch_size, args.attention_unit),
            {k: mean_rho(scores, oracle, k) for k in ("attn", "mlp")},
            peaks[name],
        )
        for name, (sec, scores) in timed.items()
    ]
    nan = {"attn": float("nan"), "mlp": float("nan")}
    compensated = (model, calib, args.fraction, held, dense, args.batch_size, args.attention_unit)
    if "obs" in names:
        rows.append(Row("obs+update", *obs_updated_kl(*compensated), nan))
    if "flap" in names:
        rows.append(Row("flap+bias", *flap_bias_kl(*compensated), nan))
    return rows


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print(
        f"\n{args.model}, lowest {args.fraction:.0%} of units ({args.attention_unit}, channels) removed per layer; "
        f"KL(dense ‖ pruned) per token on "
        f"{args.eval_tokens} held-out tokens; scored on {args.calibration_tokens} calibration tokens "
        f"({args.slow_tokens} for {', '.join(SLOW)}); "
        f"{torch.get_num_threads()} torch threads\n"
    )
    head = f"| {'criterion':<13} | {'score s':>8} | {'peak MiB':>8} | {'KL attn':>8} | {'KL mlp':>8} | {'KL both':>8} "
    print(head + f"| {'ρ attn':>7} | {'ρ mlp':>7} |")
    print("|" + "|".join("-" * (w + 2) for w in (13, 8, 8, 8, 8, 8, 7, 7)) + "|")
    for r in sorted(rows, key=lambda r: r.kl["both"]):
        print(
            f"| {r.name:<13} | {r.seconds:>8.2f} | {r.peak_mib:>8.0f} | {r.kl['attn']:>8.2e} | {r.kl['mlp']:>8.2e} "
            f"| {r.kl['both']:>8.2e} | {r.rho['attn']:>7.2f} | {r.rho['mlp']:>7.2f} |"
        )
    base = {n: next((r.kl["both"] for r in rows if r.name == n), None) for n in ("random", "magnitude")}
    if None not in base.values():
        worse = [r.name for r in rows if r.name not in base and r.kl["both"] >= min(base.values())]
        print(f"\ncriteria not beating both random and magnitude (KL both): {', '.join(worse) or 'none'}")


def print_families(tables: dict[str, list[Row]], args: argparse.Namespace) -> None:
    """One column per family: KL (both cut) of each criterion on that family's randomly initialised model."""
    names = sorted({r.name for rows in tables.values() for r in rows})
    print(f"\nrandomly initialised models at {args.model}'s sizes, one per family; lowest {args.fraction:.0%} of "
          f"units ({args.attention_unit}, channels) removed per layer; KL(dense ‖ pruned) per token on "
          f"{args.eval_tokens} held-out tokens (compare criteria within a column)\n")
    short = [a.removesuffix("ForCausalLM") for a in tables]
    print("| criterion | " + " | ".join(short) + " |")
    print("|---|" + "---|" * len(short))
    for name in names:
        cells = [next((f"{r.kl['both']:.2e}" for r in rows if r.name == name), "") for rows in tables.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--data", default="builtin:pydoc")
    parser.add_argument("--criteria", default="", help="comma-separated names; default: all registered")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--options", default="", help="criterion settings, name.key=value,... "
                        "(e.g. mini_llm.probes=8,hessian_trace.probes=4)")
    parser.add_argument("--attention-unit", choices=("kv_group", "q_head"), default="kv_group")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=6144)
    parser.add_argument("--slow-tokens", type=int, default=1024, help=f"calibration tokens for {', '.join(SLOW)}")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--families", default="", help="'all' or comma-separated architectures: score randomly "
                        "initialised models of these families at --model's sizes, one KL column each")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.families:
        from workers import families

        chosen = list(families.FAMILIES) if args.families == "all" else args.families.split(",")
        print_families({a: run(args, a) for a in chosen}, args)
        return
    print_table(run(args), args)


if __name__ == "__main__":
    main()
