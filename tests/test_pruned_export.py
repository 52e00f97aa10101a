"""Exported pruned models load in stock transformers (trust_remote_code) with darwinfront's logits, and the
files that travel with them import nothing of darwinfront.

The stock-transformers checks run `tests/outside_checks.py` in a subprocess of this interpreter with every import
of darwinfront's packages made to fail; `test_outside_env.py` runs the same script in a virtual environment that
has no darwinfront at all.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from workers import families, slicing
from workers.pruned_hf import export, model_card

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ROOT / "tests" / "outside_checks.py"
# Files that leave darwinfront, and the only top-level modules they may import.
TRAVELLING = [*sorted((ROOT / "workers" / "pruned_hf").glob("modeling_pruned_*.py")),
              ROOT / "workers" / "pruned_hf" / "pruned_layers.py",
              ROOT / "workers" / "kv" / "cache.py", ROOT / "workers" / "kv" / "quant.py"]
ALLOWED_IMPORTS = {"__future__", "collections", "copy", "dataclasses", "math", "typing", "torch", "transformers",
                   "huggingface_hub", "packaging"}


def tiny_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
                           initializer_range=0.15, sliding_window=None)
    return MistralForCausalLM(config).eval()


def odd_layout(model, unit: str) -> slicing.Layout:
    """Layer 0: an uneven cut (q_head: 3 query heads on 2 KV heads); layer 1: no attention (and one expert of a
    mixture of experts); layer 2: no MLP."""
    d = slicing.dims(model)
    attn = (0, 1, 3) if unit == "q_head" else (1,)
    layers = [(attn, tuple(range(0, d.mlp_units, 2))), ((), (2,) if d.experts else tuple(range(10))),
              (tuple(range(d.attn_units(unit))), ())]
    return slicing.Layout(tuple(slicing.LayerLayout(a, m) for a, m in layers), unit, d.mlp_unit)


def export_model(model, unit: str, folder: Path, shifts: bool = False) -> torch.Tensor:
    """Slice `model` to `odd_layout` (with `shifts`, a compensating output shift on layer 0's attention and on the
    removed sub-blocks), save it to `folder` with the logits `load_pruned` gives; return them."""
    slicing.slice_model(model, odd_layout(model, unit))
    if shifts:
        generator = torch.Generator().manual_seed(2)
        for i, kind in ((0, "attn"), (1, "attn"), (2, "mlp")):
            shift = torch.randn(model.config.hidden_size, generator=generator)
            slicing.add_output_shift(model.model.layers[i], kind, shift)
    slicing.save_pruned(model, None, folder)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    loaded = export.load(folder)  # what load_pruned gives, less the tokenizer (none here)
    with torch.no_grad():
        logits = loaded(input_ids=tokens).logits
        torch.testing.assert_close(logits, model(input_ids=tokens).logits, atol=1e-6, rtol=0)
    torch.save({"tokens": tokens, "logits": logits}, folder / "expected.pt")
    return logits


def run_outside(folders: list[Path], tmp_path: Path, python: str = sys.executable, block: bool = True) -> dict:
    """Run `outside_checks.py` on `folders` in `python`, without this checkout on its path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # transformers copies remote code under it
    result = tmp_path / "outside.json"
    args = [python, str(CHECKS), *(["--block-darwinfront"] if block else []), str(result), *map(str, folders)]
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(result.read_text())


CASES = [("llama_gqa", "q_head", True), ("llama_bias", "kv_group", True), ("llama_mha", "q_head", False),
         ("qwen2_bias", "q_head", True), ("mistral", "kv_group", False), ("qwen3", "q_head", True),
         ("gemma2", "q_head", False), ("gemma3", "kv_group", True), ("phi3", "q_head", True),
         ("phi3", "kv_group", False), ("olmo2", "q_head", True), ("olmo2", "kv_group", False),
         ("mixtral", "q_head", True), ("qwen3_moe", "kv_group", False), ("olmoe", "q_head", True),
         ("gpt_neox", "q_head", True), ("gpt_neox", "kv_group", False)]


def test_every_family_exports_to_stock_transformers_with_darwinfronts_logits(tmp_path):
    folders, prefixes = [], []
    for kind, unit, shifts in CASES:
        model = tiny_mistral() if kind == "mistral" else tiny_model(kind)
        prefixes.append(families.family_of(model).prefix)
        folders.append(tmp_path / f"{kind}-{unit}")
        export_model(model, unit, folders[-1], shifts=shifts)
    results = run_outside(folders, tmp_path)
    assert set(prefixes) == {f.prefix for f in families.FAMILIES.values()}  # every family goes outside
    for prefix, folder in zip(prefixes, folders, strict=True):
        got = results[str(folder)]
        assert got["class"] == f"Pruned{prefix}ForCausalLM"
        assert got["max_diff"] <= 1e-5 and got["round_trip_diff"] == 0.0
        assert got["generated"] == 6 and got["cache_agrees"]
        assert got["lora"] is None  # no peft here; test_outside_env attaches one


def test_the_weights_are_save_pretraineds_and_the_archive_holds_the_folder_byte_for_byte(tmp_path):
    """`save_pruned` streams the weights itself (into a file, or straight into a tar): for every family the file
    holds exactly the tensors `save_pretrained` writes (tied weights once), and the archive the folder's files
    (`test_exports` checks the weights written in another dtype)."""
    import tarfile

    from safetensors import safe_open

    for kind in sorted({kind for kind, _, _ in CASES}):
        model = tiny_mistral() if kind == "mistral" else tiny_model(kind)
        slicing.slice_model(model, odd_layout(model, "kv_group"))
        folder, reference, packed = tmp_path / kind, tmp_path / f"{kind}-reference", tmp_path / f"{kind}-archive"
        slicing.save_pruned(model, None, folder)
        # (transformers saves a stock mixture of experts under its checkpoints' own names, Mixtral's
        # `block_sparse_moe`; the exported class, which loads ours, saves the names the file holds)
        (export.load(folder) if families.shape(model).experts else model).save_pretrained(reference)
        with safe_open(folder / "model.safetensors", "pt") as ours, \
                safe_open(reference / "model.safetensors", "pt") as theirs:
            names = sorted(theirs.keys())
            assert sorted(ours.keys()) == names, kind
            for key in names:
                assert torch.equal(ours.get_tensor(key), theirs.get_tensor(key)), (kind, key)
        archive = slicing.save_pruned(model, None, packed, archive="c1")
        assert archive == packed / "c1.tar" and [p.name for p in packed.iterdir()] == ["c1.tar"]
        with tarfile.open(archive, "r:") as tar:
            members = {m.name.removeprefix("c1/"): tar.extractfile(m).read() for m in tar if m.isfile()}
        assert members == {p.name: p.read_bytes() for p in folder.iterdir()}, kind


def test_the_config_states_each_layers_shapes_and_names_its_code(tmp_path):
    model = tiny_model("llama_gqa")
    export_model(model, "q_head", tmp_path / "m", shifts=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "darwinfront_llama" and config["architectures"] == ["PrunedLlamaForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_pruned_llama.PrunedLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_pruned_llama.PrunedLlamaForCausalLM"}
    assert config["layer_shapes"] == [
        {"num_attention_heads": 3, "num_key_value_heads": 2, "intermediate_size": 24, "kv_head_of_query": [0, 0, 1],
         "attention_output_bias": True, "mlp_output_bias": False},
        {"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 10, "kv_head_of_query": None,
         "attention_output_bias": True, "mlp_output_bias": False},
        {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 0, "kv_head_of_query": None,
         "attention_output_bias": False, "mlp_output_bias": True},
    ]
    loaded = export.load(tmp_path / "m")  # the shifts are buffers: the parameters are the structure's
    assert slicing.count_parameters(loaded) == slicing.count_parameters(model)
    assert (config["num_attention_heads"], config["intermediate_size"]) == (4, 48)  # the dense model's
    assert {p.name for p in (tmp_path / "m").glob("*.py")} == {"modeling_pruned_llama.py", "pruned_layers.py"}


def test_a_reloaded_model_saves_again_to_the_same_model(tmp_path):
    model = tiny_model("qwen2_bias")
    logits = export_model(model, "q_head", tmp_path / "a")
    loaded = export.load(tmp_path / "a")
    assert slicing.Layout.from_dict(loaded.config.darwinfront_layout) == odd_layout(tiny_model("qwen2_bias"), "q_head")
    slicing.save_pruned(loaded, None, tmp_path / "b")
    again = export.load(tmp_path / "b")
    tokens = torch.load(tmp_path / "a" / "expected.pt")["tokens"]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=tokens).logits, logits, atol=0, rtol=0)
    assert slicing.count_parameters(again) == slicing.count_parameters(model)


def _shape(heads: int, kv_heads: int, index: list[int] | None = None) -> dict:
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": 8,
            "kv_head_of_query": index, "attention_output_bias": False, "mlp_output_bias": False}


@pytest.mark.parametrize("shapes, words", [
    ([_shape(3, 2)] * 3, "layer_shapes[0]: 3 query heads do not group evenly on 2 KV heads"),
    ([_shape(2, 2, [0, 2])] * 3, "layer_shapes[0].kv_head_of_query"),
    ([_shape(2, 0)] * 3, "layer_shapes[0]: 2 query heads on 0 KV heads"),
    ([_shape(2, 2), {"num_attention_heads": 2}, _shape(2, 2)], "layer_shapes[1]: expected the keys"),
    ([], "expected a list of 3 layers"),
])
def test_bad_layer_shapes_are_refused_naming_the_layer(shapes, words):
    config_class = families.FAMILIES["LlamaForCausalLM"].config_class
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        config_class(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                     layer_shapes=shapes)


def test_a_directory_of_another_model_is_refused_with_what_to_do(tmp_path):
    model = tiny_model("llama_gqa")
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not a pruned model directory.*export it again"):
        export.load(tmp_path / "dense")


@pytest.mark.parametrize("path", TRAVELLING, ids=lambda p: p.name)
def test_travelling_code_imports_only_torch_and_transformers(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [] if node.level else [node.module]  # relative: a file that travels with it
        else:
            continue
        assert {n.split(".")[0] for n in names} <= ALLOWED_IMPORTS, (path.name, names)


def test_the_model_card_states_source_configuration_metrics_and_loading(tmp_path):
    model = tiny_model("llama_gqa")
    export_model(model, "q_head", tmp_path / "m")
    configuration = {"candidate_id": "t0-g3-s1-c2", "model": {"source": "/models/tiny", "architecture":
                     "LlamaForCausalLM"}, "parameters": 5000, "dense_parameters": 10000, "target": 0.5,
                     "criterion": "obs", "attention_unit": "q_head", "seed": 7, "weights": "trained",
                     "training": {"seed": 3, "tokens": 2048}, "metrics": {"kl": 0.125, "perplexity": 9.5}}
    card = model_card.write(tmp_path / "m", configuration).read_text()
    assert "# tiny pruned to 50.0% of its parameters" in card
    assert "`/models/tiny` (LlamaForCausalLM): 5,000 of 10,000 parameters kept (target 0.5)" in card
    assert "short fine-tune the search scored (2,048 tokens, seed 3)" in card
    assert "| `kl` | 0.125 |" in card and "| `perplexity` | 9.5 |" in card and "latency" not in card
    assert "| 0 | 3 | 2 | 24 |" in card and "| 1 | 0 | 0 | 10 |" in card and "| 2 | 4 | 2 | 0 |" in card
    assert 'from_pretrained("path/to/this/directory", trust_remote_code=True)' in card


def test_outside_md_python_blocks_parse():
    """They run in test_outside_env.py (integration), in an environment without darwinfront."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "OUTSIDE.md").read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 3
    for block in blocks:
        compile(block, "OUTSIDE.md", "exec")
