"""A pruned model from the prune job's own export, and docs/OUTSIDE.md's blocks, in an environment without
darwinfront: torch, the same transformers, and peft, in a virtual environment cached under $DARWINFRONT_CACHE_DIR.

The model is micro-llama cut by query heads, with one layer's whole attention and the other's whole MLP removed,
exported the way a prune job exports a front candidate (`Evaluator.export`, then its model card).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
import torch
import transformers
from filelock import FileLock
from test_pruned_export import run_outside

from darwinfront.core.methods import parse_spec
from search.genome import LevelSpace, PruneGenome
from workers import slicing
from workers.kv.cache import KVPrecisionConfig
from workers.pruned_hf import model_card

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ROOT / "docs" / "OUTSIDE.md"
TORCH = torch.__version__.split("+")[0]
PEFT = "0.21.2"
SPEC = {
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "train_tokens": 2048, "database_tokens": 2048, "eval_tokens": 256,
             "seq_len": 64},
    "prune": {"targets": [0.5], "levels": 16, "criterion": "wanda_sp", "attention_unit": "q_head"},
    "search": {"generations": 1, "offspring": 2, "train_tokens": [256]},
    "seed": 5,
}
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="session")
def outside_python() -> str:
    """The python of a venv with torch, this transformers and peft, and no darwinfront; built once, under a lock."""
    name = f"outside-env-torch{TORCH}-transformers{transformers.__version__}-peft{PEFT}"
    folder = Path(os.environ["DARWINFRONT_CACHE_DIR"]) / name
    python = folder / "bin" / "python"
    with FileLock(str(folder) + ".lock"):
        if not (folder / "ready").exists():
            shutil.rmtree(folder, ignore_errors=True)
            venv.EnvBuilder(with_pip=True).create(folder)
            packages = [f"torch=={TORCH}", f"transformers=={transformers.__version__}", f"peft=={PEFT}"]
            subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, timeout=1800)
            (folder / "ready").write_text(" ".join(packages))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", "import workers"], capture_output=True, cwd="/", env=env)
    assert done.returncode != 0, "darwinfront must not be importable in the outside environment"
    return str(python)


@pytest.fixture(scope="module")
def exported(micro_dir, tmp_path_factory) -> Path:
    """A q_head candidate of micro-llama with no attention in layer 0 and no MLP in layer 1, as a job exports it."""
    from workers.evaluator import Evaluator
    from workers.prepare import prepare

    spec = parse_spec(SPEC).model_dump(mode="json")
    prepared = prepare(spec)
    space = LevelSpace.from_dict(prepared["space"])
    rest = space.n_layers - 1
    genome = PruneGenome(attn=(space.attn_levels,) + (1,) * rest, mlp=(2,) + (space.mlp_levels,) * rest)
    evaluator = Evaluator(spec, prepared)
    request = {"genome": genome.to_dict(), "seed": 3, "train_tokens": 256}
    configuration = evaluator.configuration(request, {"candidate_id": "t0-g1-s0-c0", "target": 0.5, "kl": 0.5})
    folder = tmp_path_factory.mktemp("outside") / "t1-g7-s2-c0"  # the name docs/OUTSIDE.md loads
    evaluator.export(configuration, str(folder))
    model_card.write(folder, configuration)
    model, tokenizer = slicing.load_pruned(folder)
    tokens = tokenizer("def add(a, b):\n    return a + b\n\nprint(add(1, 2))", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.save({"tokens": tokens, "logits": model(input_ids=tokens).logits}, folder / "expected.pt")
    return folder


def test_a_jobs_export_loads_generates_round_trips_and_takes_lora_without_darwinfront(outside_python, exported,
                                                                                        tmp_path):
    shapes = json.loads((exported / "config.json").read_text())["layer_shapes"]
    assert shapes[0]["num_attention_heads"] == 0 and shapes[1]["intermediate_size"] == 0
    assert shapes[1]["kv_head_of_query"] is not None  # 3 query heads on 2 KV heads
    got = run_outside([exported], tmp_path, python=outside_python, block=False)[str(exported)]
    assert got["class"] == "PrunedLlamaForCausalLM"
    assert got["max_diff"] <= 1e-5 and got["round_trip_diff"] == 0.0
    assert got["generated"] == 6 and got["cache_agrees"]
    lora = got["lora"]
    assert lora["start_diff"] <= 1e-6 and lora["adapters"] > 0 and lora["only_lora_trains"]
    assert lora["grads"] == lora["adapters"]
    assert "trust_remote_code=True" in (exported / "README.md").read_text()


def test_outside_md_python_blocks_run_without_darwinfront(outside_python, exported, micro_dir, tmp_path):
    shutil.copytree(exported, tmp_path / exported.name)
    shutil.copytree(micro_dir, tmp_path / "my-llama")
    package = tmp_path / "kvcache"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("cache.py", "quant.py"):
        shutil.copyfile(ROOT / "workers" / "kv" / name, package / name)
    layers = json.loads((micro_dir / "config.json").read_text())["num_hidden_layers"]
    precision = KVPrecisionConfig(layers=((4, 2),) + ((8, 4),) * (layers - 1), mode="kivi", group_size=8, residual=8)
    micro = json.loads((micro_dir / "config.json").read_text())
    head_dim = micro.get("head_dim") or micro["hidden_size"] // micro["num_attention_heads"]
    (tmp_path / "kv-12.json").write_text(json.dumps({"format": "darwinfront.kv_precision/1",
                                                     **precision.to_dict(), "kv_map": precision.to_kv_map(head_dim)}))
    blocks = _BLOCK.findall(OUTSIDE.read_text())
    assert len(blocks) == 3
    script = tmp_path / "outside_md.py"
    script.write_text("\n".join(blocks))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run([outside_python, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "def fibonacci(n):" in done.stdout and "'num_attention_heads': 0" in done.stdout
    assert "trainable params" in done.stdout
    assert "((4, 2), (8, 4)" in done.stdout and "bytes of K/V held" in done.stdout

