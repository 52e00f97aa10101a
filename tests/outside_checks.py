"""Checks of exported models run as a script in another interpreter, where darwinfront must not be importable.

`python tests/outside_checks.py RESULT.json DIR [DIR ...]`: each DIR is an exported model directory holding
`expected.pt` ({"tokens": (B, T), "logits": (B, T, vocab)} from darwinfront's `load_pruned`). For each, the model is
loaded with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and the script records the largest
logit difference, whether greedy `generate` with the cache gives what it gives without, the logit difference after
a `save_pretrained` round trip, and (when peft is installed) whether a LoRA adapter attaches, starts as a no-op and
trains. `--block-darwinfront` makes every import of darwinfront's packages fail first (for the main environment,
where darwinfront is installed).
"""

from __future__ import annotations

import importlib.abc
import json
import sys
import tempfile
from pathlib import Path

DARWINFRONT_PACKAGES = ("darwinfront", "workers", "search", "service")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in DARWINFRONT_PACKAGES:
            raise ImportError(f"{name} imported outside darwinfront")
        return None


def check(folder: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    expected = torch.load(folder / "expected.pt")
    tokens = expected["tokens"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits  # (B, T, vocab)
        prompt = tokens[:1, :4]
        cached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    out = {"class": type(model).__name__, "max_diff": float((logits - expected["logits"]).abs().max()),
           "generated": cached.shape[1] - prompt.shape[1], "cache_agrees": cached.tolist() == uncached.tolist()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        again = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            out["round_trip_diff"] = float((again(input_ids=tokens).logits - logits).abs().max())
    out["lora"] = _lora(model, tokens, logits)
    return out


def _lora(model, tokens, logits) -> dict | None:
    """Attach LoRA to every attention and MLP projection that exists; None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    import torch

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        start_diff = float((peft_model(input_ids=tokens).logits - logits).abs().max())  # LoRA B starts at zero
    peft_model.train()
    loss = peft_model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    adapters = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    return {"start_diff": start_diff, "adapters": len(adapters),
            "only_lora_trains": all("lora_" in n for n, _ in adapters),
            "grads": sum(p.grad is not None for _, p in adapters)}


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--block-darwinfront":
        sys.meta_path.insert(0, _Blocker())
        argv = argv[1:]
    result, folders = Path(argv[0]), [Path(a) for a in argv[1:]]
    result.write_text(json.dumps({str(f): check(f) for f in folders}))


if __name__ == "__main__":
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent.parent]
    main(sys.argv[1:])
