"""The KV precision map: a configuration's per-layer K/V precision in the shape serving engines read, and back.

The cache module reads it standing alone: `workers/kv/cache.py` and `quant.py` copied into another package build
the cache for `generate` while every import of darwinfront fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workers.kv.cache import InvalidKVConfig, KVPrecisionConfig

ROOT = Path(__file__).resolve().parent.parent


def test_a_kivi_map_gives_each_layers_streams():
    config = KVPrecisionConfig(layers=((4, 2), (16, 8)), mode="kivi")
    assert config.to_kv_map(head_dim=64) == {"format": "kv_precision_map/1", "mode": "kivi", "head_dim": 64, "layers": [
        {"layer": 0, "key": {"bits": 4, "axis": "channel", "group_size": 32},
         "value": {"bits": 2, "axis": "token", "group_size": 32}, "residual": 32},
        {"layer": 1, "key": {"bits": 16, "axis": "channel", "group_size": None},
         "value": {"bits": 8, "axis": "token", "group_size": 32}, "residual": 32},
    ]}


def test_a_per_token_map_defaults_the_group_to_the_head():
    layer = KVPrecisionConfig.uniform(8, 4, 2).to_kv_map(head_dim=16)["layers"][1]
    assert layer == {"layer": 1, "key": {"bits": 8, "axis": "token", "group_size": 16},
                     "value": {"bits": 4, "axis": "token", "group_size": 16}, "residual": 0}


@pytest.mark.parametrize("config", [
    KVPrecisionConfig(layers=((4, 2), (16, 8), (2, 2)), mode="kivi", group_size=16, residual=64),
    KVPrecisionConfig(layers=((16, 16), (16, 4)), mode="kivi"),
    KVPrecisionConfig(layers=((8, 4), (4, 4)), mode="per_token", group_size=8, residual=16),
    KVPrecisionConfig.uniform(16, 16, 2),
])
def test_the_map_reads_back_to_a_cache_of_the_same_precision(config):
    kv_map = json.loads(json.dumps(config.to_kv_map(head_dim=32)))
    back = KVPrecisionConfig.from_kv_map(kv_map)
    assert back.layers == config.layers and back.mode == config.mode and back.residual == config.residual
    assert back.to_kv_map(head_dim=32) == kv_map


def test_a_map_this_cache_cannot_run_is_refused_naming_the_layer():
    kv_map = KVPrecisionConfig.uniform(4, 4, 3, mode="kivi").to_kv_map(head_dim=32)
    kv_map["layers"][2]["residual"] = 64
    with pytest.raises(InvalidKVConfig, match=r"kv_map.layers\[2\].*one mode, group size and residual"):
        KVPrecisionConfig.from_kv_map(kv_map)
    with pytest.raises(InvalidKVConfig, match="kv_map.format"):
        KVPrecisionConfig.from_kv_map({"layers": []})


STANDALONE = """
import json, sys, importlib.abc
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("darwinfront", "workers", "search", "service"):
            raise ImportError(name)
sys.meta_path.insert(0, Blocker())
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from mykv.cache import KVPrecisionConfig, build_cache
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=48)).eval()
cache = build_cache(model, KVPrecisionConfig.from_kv_map(json.load(open("kv_map.json"))))
out = model.generate(torch.tensor([[1, 2, 3]]), past_key_values=cache, max_new_tokens=5, min_new_tokens=5,
                     do_sample=False)
print(out.shape[1], cache.get_seq_length(), [list(layer) for layer in cache.precision.layers])
"""


def test_the_cache_module_builds_the_cache_from_a_map_without_darwinfront(tmp_path):
    package = tmp_path / "mykv"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("cache.py", "quant.py"):
        shutil.copyfile(ROOT / "workers" / "kv" / name, package / name)
    kv_map = KVPrecisionConfig(layers=((4, 2), (8, 16)), mode="per_token").to_kv_map(head_dim=8)
    (tmp_path / "kv_map.json").write_text(json.dumps(kv_map))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", STANDALONE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == "8 7 [[4, 2], [8, 16]]"  # 3 prompt + 5 new; the last token is not cached
