"""The README.md (a model card) of an exported model directory: where the model came from, how it was cut, what
it scores and how to load it without darwinfront."""

from __future__ import annotations

import json
from pathlib import Path

_METRICS = {
    "kl": "KL(dense ‖ model) the search scored, on the fitness pool",
    "kl_cut": "KL of the structure alone (dense weights of the kept units)",
    "kl_oneshot": "KL of the one-shot model (with the level database's weight updates)",
    "held_out_kl": "KL on held-out tokens",
    "perplexity": "perplexity on held-out tokens",
    "latency_ms": "median forward latency (ms)",
    "dense_latency_ms": "the dense model's median forward latency (ms)",
}


def write(path: Path, configuration: dict) -> Path:
    """Write `path/README.md` for the model saved in `path` from its configuration document."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    shapes = config["layer_shapes"]
    stored = f" Stored in {config['dtype']}." if config.get("dtype") else ""
    model = configuration.get("model", {})
    metrics = configuration.get("metrics", {})
    kept = configuration["parameters"] / configuration["dense_parameters"]
    lines = [
        "---", "library_name: transformers", "tags: [darwinfront, pruned, structured-pruning]", "---", "",
        f"# {Path(str(model.get('source', 'model'))).name} pruned to {kept:.1%} of its parameters",
        "",
        f"Structured pruning by darwinfront of `{model.get('source')}` ({model.get('architecture')}): "
        f"{configuration['parameters']:,} of {configuration['dense_parameters']:,} parameters kept "
        f"(target {configuration.get('target')}), candidate `{configuration['candidate_id']}`, criterion "
        f"`{configuration.get('criterion')}`, attention units `{configuration.get('attention_unit', 'kv_group')}`, "
        f"seed {configuration.get('seed')}. Weights: {_weights(configuration)}.{stored}",
        "",
        "## Metrics", "", "| metric | value | meaning |", "| --- | --- | --- |",
        *(f"| `{k}` | {metrics[k]:.6g} | {meaning} |" for k, meaning in _METRICS.items()
          if isinstance(metrics.get(k), int | float)),
        "",
        "## Layers", "",
        "Per decoder layer, what is kept (0 query heads: no attention; 0 MLP channels: no MLP). "
        "`config.json` holds the same as `layer_shapes`.", "",
        *_layer_table(shapes, config.get("expert_width")),
        "",
        "## Load it", "",
        "With torch and transformers only (the modeling code ships in this directory):", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
        "",
    ]
    target = path / "README.md"
    target.write_text("\n".join(lines))
    return target


def _layer_table(shapes: list[dict], expert_width: int | None) -> list[str]:
    """The kept widths per layer; a mixture of experts' also counts its experts (channels / expert width)."""
    experts = " experts |" if expert_width else ""
    rows = ["| layer | query heads | KV heads | MLP channels |" + experts, "| --- | --- | --- | --- |" +
            (" --- |" if expert_width else "")]
    for i, s in enumerate(shapes):
        row = f"| {i} | {s['num_attention_heads']} | {s['num_key_value_heads']} | {s['intermediate_size']} |"
        rows.append(row + (f" {s['intermediate_size'] // expert_width} |" if expert_width else ""))
    return rows


def _weights(configuration: dict) -> str:
    weights = configuration.get("weights")
    if weights == "posttrained":
        post = configuration["posttrain"]
        return (f"post-trained on {post['tokens']:,} tokens ({post['loss']} loss, lr {post['lr']}) from the front of "
                f"job `{post['job']}`")
    if weights == "trained":
        training = configuration.get("training") or {}
        tokens, seed = training.get("tokens", 0), training.get("seed")
        return f"the short fine-tune the search scored ({tokens:,} tokens, seed {seed})"
    return {"database": "the level database's one-shot weight updates", "dense": "the dense weights of the kept units"
            }.get(weights, str(weights))
