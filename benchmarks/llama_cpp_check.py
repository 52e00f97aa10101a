"""llama.cpp runs darwinfront's GGUF export of a pruned candidate as PyTorch runs the candidate.

Cuts the model to a candidate of non-uniform widths (per layer a different share of attention units and MLP
channels, kept by Wanda-SP scores, the first two layers whole; one layer without attention, one without MLP),
saves it as `save_pruned` does and writes
it and the dense model as GGUF (`darwinfront.gguf_export`). Then, side by side in one run:

- perplexity of the held-out pydoc tokens in PyTorch (the loaded `load_pruned` model, float32) and in llama.cpp
  (the f16 GGUF, the same token ids, the same positions): goal within 1 %;
- a greedy generation from the same prompt ids: goal, the first `--match` tokens equal;
- llama.cpp's tokenizer on held-out texts against the Hugging Face tokenizer (the share of texts tokenized alike);
- llama.cpp's tokens/s (prompt evaluation and one-token decoding) of the dense and the pruned GGUF, alternating,
  as a ratio pruned / dense.

llama.cpp comes from `llama-cpp-python`, which builds from source (about 10 minutes on two cores): build the wheel
once as `BUILD` below says (for AVX2: a native build uses AMX where the CPU has it, and ggml's AMX matrix product
crashed on small GGUFs here; `.ci/run` builds the same); this script installs it into a
venv beside the wheel on first use (or give `--llama-python`) and runs llama.cpp there, since the project's own
environment does not carry it.

    PYTHONPATH=. python benchmarks/llama_cpp_check.py --model builtin:smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WHEELS = Path(os.environ.get("DARWINFRONT_WHEELS", "/var/tmp/darwinfront-wheels/portable-avx2"))
LLAMA_CPP = "llama-cpp-python==0.3.36"  # the release .ci/run builds and these checks were measured with
BUILD = (f'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
         f"pip wheel --no-cache-dir --no-deps -w {WHEELS} {LLAMA_CPP}")
VENV_PACKAGES = ["numpy", "diskcache", "jinja2", "typing-extensions"]  # llama-cpp-python's own requirements


def llama_python(create: bool = True) -> Path | None:
    """A Python that imports `llama_cpp`: `$DARWINFRONT_LLAMA_PYTHON`, else the venv beside the cached wheel
    (made on first use with `create`); None when no wheel is cached."""
    if os.environ.get("DARWINFRONT_LLAMA_PYTHON"):
        return Path(os.environ["DARWINFRONT_LLAMA_PYTHON"])
    wheels = sorted(WHEELS.glob("llama_cpp_python-*.whl"))
    if not wheels:
        return None
    venv = WHEELS / f"venv-{wheels[-1].name.removesuffix('.whl')}"
    python, ready = venv / "bin" / "python", venv / ".installed"
    if not ready.exists() and create:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--no-deps", str(wheels[-1])], check=True)
        subprocess.run([*pip, *VENV_PACKAGES], check=True)
        ready.touch()
    return python if ready.exists() else None


def llama_side(job: dict) -> dict:
    """Run in the llama.cpp venv: per GGUF file, the mean next-token NLL of `sequences`, the greedy continuation of
    `prompt`, the tokenization of `texts`, and tokens/s (prompt evaluation, decoding) over `rounds` rounds."""
    import numpy as np
    from llama_cpp import Llama

    def load(path: str) -> Llama:
        return Llama(model_path=path, n_ctx=job["n_ctx"], logits_all=True, n_threads=job["threads"],
                     n_threads_batch=job["threads"], n_batch=job["n_ctx"], verbose=False)

    def nll(llm: Llama, tokens: list[int]) -> float:
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)  # (T-1, vocab)
        top = logits.max(-1, keepdims=True)
        logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        return float(-logprobs[np.arange(len(tokens) - 1), tokens[1:]].sum())

    def greedy(llm: Llama, prompt: list[int], n: int) -> tuple[list[int], float]:
        llm.reset()
        llm.eval(prompt)
        out, started = [], time.perf_counter()
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return out, n / (time.perf_counter() - started)

    results = {}
    models = {name: load(path) for name, path in job["files"].items()}
    for name, llm in models.items():
        total = sum(nll(llm, seq) for seq in job["sequences"])
        generated, _ = greedy(llm, job["prompt"], job["new_tokens"])
        tokens = [llm.tokenize(text.encode(), add_bos=False, special=False) for text in job["texts"]]
        results[name] = {"nll": total / sum(len(s) - 1 for s in job["sequences"]), "generated": generated,
                         "tokens": tokens, "prompt_tps": [], "decode_tps": []}
    for _ in range(job["rounds"]):  # alternate the models, so a busy machine slows them alike
        for name, llm in models.items():
            started = time.perf_counter()
            for seq in job["sequences"][: job["speed_sequences"]]:
                llm.reset()
                llm.eval(seq)
            seconds = time.perf_counter() - started
            results[name]["prompt_tps"].append(sum(map(len, job["sequences"][: job["speed_sequences"]])) / seconds)
            results[name]["decode_tps"].append(greedy(llm, job["prompt"], job["speed_tokens"])[1])
    return results


def candidate_layout(model, unit: str, calibration):
    """Non-uniform widths, the kept units by Wanda-SP scores on `calibration` (N, T): from layer 2 on, attention
    keeps a cycling share of its units and the MLP another (layers 0 and 1 stay whole); the third-last layer keeps
    no attention and the second-last no MLP."""
    import torch

    from workers import criteria, slicing

    scores = criteria.get("wanda_sp", attention_unit=unit).score(model, calibration)
    d = slicing.dims(model)
    n = len(model.model.layers)
    shares_attn, shares_mlp = (1.0, 0.67, 1.0, 0.75), (1.0, 0.875, 0.75, 0.875)
    layers = []
    for i, layer_scores in enumerate(scores.layers):
        share_attn, share_mlp = (1.0, 1.0) if i < 2 else (shares_attn[i % 4], shares_mlp[i % 4])
        keep_attn = 0 if i == n - 3 else max(1, round(d.attn_units(unit) * share_attn))
        keep_mlp = 0 if i == n - 2 else round(d.intermediate * share_mlp)
        attn = tuple(sorted(torch.argsort(layer_scores.attn, descending=True)[:keep_attn].tolist()))
        mlp = tuple(sorted(torch.argsort(layer_scores.mlp, descending=True)[:keep_mlp].tolist()))
        layers.append(slicing.LayerLayout(attn, mlp))
    return slicing.Layout(tuple(layers), unit)


def run(args) -> dict:
    """The whole check on `args.model`; returns the figures (and writes them to `--json`)."""
    import torch

    from darwinfront.gguf_export import write_gguf
    from workers import data, metrics, modeling, slicing

    torch.set_num_threads(args.threads)
    python = Path(args.llama_python) if args.llama_python else llama_python()
    if python is None:
        raise SystemExit(f"no llama-cpp-python wheel in {WHEELS}: build it once with `{BUILD}` (~10 min on 2 cores)")
    dense_dir = Path(modeling.resolve_source(args.model))
    model, tokenizer = modeling.load_model(args.model, device="cpu")
    dense_parameters = sum(p.numel() for p in model.parameters())
    unit = args.unit
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = data.load_texts("builtin:pydoc")
        calibration = data.token_sequences(tokenizer, texts, n_tokens=512, seq_len=args.seq_len, split="calibration",
                                           seed=0)  # (N, T)
        slicing.slice_model(model, candidate_layout(model, unit, calibration))
        slicing.save_pruned(model, tokenizer, work / "candidate")
        pruned, tokenizer = slicing.load_pruned(work / "candidate")  # what a user of the archive gets
        started = time.perf_counter()  # the three GGUF files
        summaries = {
            "pruned": write_gguf(work / "candidate", work / "pruned.f16.gguf", "f16"),
            "pruned_q8_0": write_gguf(work / "candidate", work / "pruned.q8_0.gguf", "q8_0"),
            "dense": write_gguf(dense_dir, work / "dense.f16.gguf", "f16"),
        }
        export_seconds = time.perf_counter() - started
        held_out = data.token_sequences(tokenizer, texts, n_tokens=args.tokens, seq_len=args.seq_len,
                                        split="evaluation", seed=0)  # (N, T)
        torch_ppl = metrics.perplexity(pruned, held_out, batch_size=4)
        prompt = held_out[0, : args.prompt].tolist()
        with torch.no_grad():
            out = pruned.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        torch_generated = out[0, len(prompt):].tolist()
        sample_texts = [t[:400] for t in texts[:20]]
        job = {"files": {"pruned": str(work / "pruned.f16.gguf"), "dense": str(work / "dense.f16.gguf"),
                         "pruned_q8_0": str(work / "pruned.q8_0.gguf")},
               "sequences": held_out.tolist(), "prompt": prompt, "new_tokens": args.new_tokens,
               "texts": sample_texts, "n_ctx": max(args.seq_len, args.prompt + args.speed_tokens) + 8,
               "threads": args.threads, "rounds": args.rounds, "speed_sequences": 4, "speed_tokens": args.speed_tokens}
        (work / "job.json").write_text(json.dumps(job))
        done = subprocess.run([str(python), __file__, "--llama-side", str(work / "job.json"), str(work / "out.json")],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise SystemExit(f"llama.cpp side failed:\n{done.stderr[-4000:]}")
        side = json.loads((work / "out.json").read_text())
        sizes = {name: s["size"] for name, s in summaries.items()}
    hf_tokens = [tokenizer(t)["input_ids"] for t in sample_texts]
    llama_ppl = math.exp(side["pruned"]["nll"])
    matched = next((i for i, (a, b) in enumerate(zip(torch_generated, side["pruned"]["generated"], strict=True))
                    if a != b), len(torch_generated))
    speed = {k: {name: statistics.median(side[name][k]) for name in ("dense", "pruned")}
             for k in ("prompt_tps", "decode_tps")}
    rounds = {k: {name: [round(v, 1) for v in side[name][k]] for name in ("dense", "pruned")} for k in speed}
    report = {
        "model": args.model, "unit": unit, "held_out_tokens": int(held_out.numel()), "threads": args.threads,
        "widths": {k: summaries["pruned"][k] for k in ("head_count", "head_count_kv", "feed_forward_length")},
        "parameters": {"dense": dense_parameters, "pruned": sum(p.numel() for p in pruned.parameters())},
        "torch_ppl": torch_ppl, "llama_cpp_ppl": llama_ppl, "llama_cpp_q8_0_ppl": math.exp(side["pruned_q8_0"]["nll"]),
        "ppl_rel_diff": abs(llama_ppl - torch_ppl) / torch_ppl,
        "dense_llama_cpp_ppl": math.exp(side["dense"]["nll"]),
        "generation": {"torch": torch_generated, "llama_cpp": side["pruned"]["generated"], "matching_prefix": matched},
        "tokenizer_agreement": sum(a == b for a, b in zip(hf_tokens, side["pruned"]["tokens"], strict=True))
        / len(hf_tokens),
        "tokens_per_second": speed,
        "pruned_over_dense": {k: speed[k]["pruned"] / speed[k]["dense"] for k in speed}, "speed_rounds": rounds,
        "gguf_bytes": sizes, "export_seconds": round(export_seconds, 1),
    }
    report["passed"] = report["ppl_rel_diff"] <= 0.01 and matched >= args.match
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--unit", choices=("kv_group", "q_head"), default="kv_group",
                        help="attention cut by KV groups, or by query heads (uneven groups: a KV head per query head)")
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens for the perplexity")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens of the greedy generation")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--match", type=int, default=8, help="leading generated tokens that must match")
    parser.add_argument("--speed-tokens", type=int, default=64, help="tokens decoded per speed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads of both (llama.cpp's spin on a busy CPU)")
    parser.add_argument("--llama-python", help="a Python with llama_cpp (default: the venv beside the cached wheel)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--llama-side", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.llama_side:
        job = json.loads(Path(args.llama_side[0]).read_text())
        Path(args.llama_side[1]).write_text(json.dumps(llama_side(job)))
        return 0
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
