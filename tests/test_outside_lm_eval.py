"""docs/OUTSIDE.md's lm-eval block runs as written on a prune job's export: stock lm_eval and transformers (the
model loads with trust_remote_code), the shipped local task, and the accuracy it prints is the one our own
log-likelihoods of the same model give."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from test_evaluate import TASK, _our_accuracy
from test_outside_env import OUTSIDE, exported  # noqa: F401  (the export fixture)

from workers import harness, slicing

pytestmark = pytest.mark.integration

_BLOCK = re.compile(r"^```python lm_eval\n(.*?)^```", re.MULTILINE | re.DOTALL)
LIMIT = 16  # what the block asks for


def test_the_lm_eval_block_scores_the_export_as_its_own_forward_does(exported, tmp_path):  # noqa: F811
    [block] = _BLOCK.findall(OUTSIDE.read_text())
    shutil.copytree(exported, tmp_path / exported.name)
    shutil.copytree(harness.TASKS_DIR, tmp_path / "eval_tasks")
    (tmp_path / "block.py").write_text(block)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Do you wish" not in done.stdout  # nothing asks to trust the code: the block says so
    printed = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    model, tokenizer = slicing.load_pruned(exported)
    docs = [json.loads(line) for line in (harness.TASKS_DIR / "pydoc_mc.jsonl").read_text().splitlines()[:LIMIT]]
    acc, acc_norm = _our_accuracy(model, tokenizer, docs)
    assert printed["acc,none"] == pytest.approx(acc) and printed["acc_norm,none"] == pytest.approx(acc_norm)
    assert printed["sample_len"] == LIMIT and printed["alias"] == TASK
