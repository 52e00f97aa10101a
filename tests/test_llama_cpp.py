"""The GGUF export in llama.cpp itself (llama-cpp-python, in a venv of its own beside its cached wheel):

- every layer shape the export writes (uneven query heads, a removed attention with and without its bias, a removed
  MLP with its bias, q/k/v/o and MLP biases, untied heads) gives PyTorch's logits;
- a pruned candidate of builtin:tiny-llama: perplexity within 1 % of PyTorch's, the greedy continuation equal,
  the tokenizer equal (`benchmarks/llama_cpp_check.py`, which also runs SmolLM2 for docs/BENCHMARKS.md);
- docs/OUTSIDE.md's llama-cpp-python block runs.

The wheel builds from source in about 10 minutes on two cores, too long for every CI run: without a cached wheel
these tests skip, saying how to build it once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from test_gguf_export import logits, pruned

from darwinfront.gguf_export import write_gguf
from workers import reference

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import llama_cpp_check  # noqa: E402

_BLOCK = re.compile(r"^```python llama-cpp-python\n(.*?)^```", re.MULTILINE | re.DOTALL)
LOGITS = """
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
out = {}
for path, ids in job.items():
    llm = Llama(model_path=path, n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids)
    out[path] = np.asarray(llm.scores[: len(ids)]).tolist()
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def llama_python() -> str:
    python = llama_cpp_check.llama_python()
    if python is None:
        if os.environ.get("DARWINFRONT_REQUIRE_LLAMA_CPP"):  # CI builds the wheel, so it must be there
            pytest.fail(f"DARWINFRONT_REQUIRE_LLAMA_CPP is set but {llama_cpp_check.WHEELS} holds no wheel")
        pytest.skip(f"no llama-cpp-python wheel in {llama_cpp_check.WHEELS}; build it once with "
                    f"`{llama_cpp_check.BUILD}` (about 10 minutes on 2 cores); benchmarks/llama_cpp_check.py is the "
                    "check")
    return str(python)


def test_every_layer_shape_gives_pytorchs_logits_in_llama_cpp(llama_python, tmp_path):
    tokenizer = reference.train_tokenizer(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 4, 300)
    expected, job = {}, {}
    for kind in ("llama", "llama3", "llama_bias", "qwen2", "phi3"):
        for unit, shifts in (("q_head", True), ("kv_group", False)):
            # (the file's name becomes general.name, and llama.cpp looks up Phi-3's special tokens in a model
            # named phi3, which this test tokenizer does not have)
            folder = tmp_path / f"{kind.replace('phi3', 'ph-iii')}-{unit}"
            model = pruned(kind, unit, tokenizer, folder, shifts=shifts)
            ids, expected[str(folder) + ".gguf"] = logits(model, tokenizer)
            write_gguf(folder, str(folder) + ".gguf", "f32")
            job[str(folder) + ".gguf"] = ids
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run([llama_python, "-c", LOGITS, str(tmp_path / "job.json"), str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for path, got in json.loads((tmp_path / "out.json").read_text()).items():
        want = expected[path]
        error = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
        assert error < 2e-3, (path, error)  # llama.cpp keeps K and V in f16


def test_a_tiny_llama_candidate_matches_pytorch_in_llama_cpp(llama_python, tmp_path):
    args = Namespace(model="builtin:tiny-llama", unit="q_head", tokens=1024, seq_len=128, prompt=16, new_tokens=16,
                     match=8, speed_tokens=16, rounds=1, threads=1, llama_python=llama_python)
    report = llama_cpp_check.run(args)
    assert report["ppl_rel_diff"] <= 0.01, report
    assert report["generation"]["matching_prefix"] >= 8 and report["tokenizer_agreement"] == 1.0
    widths = report["widths"]
    assert 0 in widths["head_count"] and len(set(widths["feed_forward_length"])) > 2  # non-uniform, one headless
    assert report["parameters"]["pruned"] < report["parameters"]["dense"] and report["passed"]


def test_outside_md_llama_cpp_python_block_runs(llama_python, tmp_path):
    tokenizer = reference.train_tokenizer(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 4, 300)
    pruned("llama", "q_head", tokenizer, tmp_path / "candidate", shifts=True)
    write_gguf(tmp_path / "candidate", tmp_path / "t1-g7-s2-c0.q8_0.gguf", "q8_0")  # the name the block loads
    (block,) = _BLOCK.findall((ROOT / "docs" / "OUTSIDE.md").read_text())
    done = subprocess.run([llama_python, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deci" in done.stdout and "tokens" in done.stdout
