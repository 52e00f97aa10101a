"""docs/HOWTO.md's Python blocks run as written, so the recipes cannot rot.

The blocks run in order in one namespace, in a folder holding what the recipes download: a configuration and a
sliced model archive of builtin:micro-llama, a KV precision file, and a job's Optuna study in a real Redis.
Blocks fenced as ```python notest need a server with a finished job and are only compiled.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

pytest_plugins = ["service_fixtures"]

HOWTO = Path(__file__).resolve().parent.parent / "docs" / "HOWTO.md"
CANDIDATE = "t1-g3-s0-c2"
_BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    """(info after `python`, code) of every Python block, in order."""
    return [(info.strip(), code) for info, code in _BLOCK.findall(HOWTO.read_text())]


def _downloads(folder: Path) -> dict:
    """Write what the recipes download: the configuration and archive of a half-MLP micro-llama, a KV file."""
    from workers.kv.cache import KVPrecisionConfig
    from workers.modeling import load_model
    from workers.slicing import LayerLayout, Layout, count_parameters, dense_layout, save_pruned, slice_model

    folder.mkdir()
    model, tokenizer = load_model("builtin:micro-llama", device="cpu")
    layout = Layout(tuple(LayerLayout(layer.attn_units, layer.mlp_channels[: len(layer.mlp_channels) // 2])
                          for layer in dense_layout(model).layers))
    slice_model(model, layout)
    configuration = {"format": "darwinfront.structured_prune/1", "candidate_id": CANDIDATE,
                     "layers": layout.to_dict()["layers"], "parameters": count_parameters(model), "metrics": {}}
    (folder / f"{CANDIDATE}.json").write_text(json.dumps(configuration))
    save_pruned(model, tokenizer, folder / CANDIDATE)
    with tarfile.open(folder / f"{CANDIDATE}.tar", "w") as archive:
        archive.add(folder / CANDIDATE, arcname=CANDIDATE)
    shutil.rmtree(folder / CANDIDATE)  # the recipe unpacks it
    kv = KVPrecisionConfig.uniform(4, 2, model.config.num_hidden_layers)
    (folder / "kv-precision.json").write_text(json.dumps(kv.to_dict()))
    return configuration


def _study(redis_url: str, job_id: str) -> None:
    """A job's study as the driver records it: one final-stage trial with the candidate's attributes."""
    import optuna

    from workers.tracking import open_study

    study = open_study(redis_url, job_id)
    attrs = {"candidate_id": CANDIDATE, "target": 0.5, "generation": 3, "stage": 1,
             "genome": {"attn": [0, 1], "mlp": [2, 2]}}
    study.add_trial(optuna.trial.create_trial(values=[0.12, 4096.0], user_attrs=attrs))


def test_every_python_block_is_run_or_marked():
    blocks = python_blocks()
    assert len(blocks) >= 5 and {info for info, _ in blocks} <= {"", "notest"}
    for _, code in blocks:
        compile(code, "HOWTO.md", "exec")  # the notest ones at least parse


def test_howto_python_blocks_run(micro_dir, redis_server, tmp_path, monkeypatch, capsys):
    configuration = _downloads(tmp_path / "downloads")
    _study(redis_server.url, "howto-job")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DARWINFRONT_REDIS_URL", redis_server.url)
    monkeypatch.setenv("JOB", "howto-job")
    namespace: dict = {"__name__": "howto"}
    for number, (info, code) in enumerate(python_blocks()):
        if info != "notest":
            exec(compile(code, f"docs/HOWTO.md python block {number}", "exec"), namespace)
    out = capsys.readouterr().out

    assert (tmp_path / "downloads" / CANDIDATE / "config.json").exists()  # the archive was unpacked
    assert namespace["configuration"] == configuration and f"{CANDIDATE} {{}}" in out  # applied (and checked)
    assert namespace["precision"].layers[0] == (4, 2)
    cache, inputs = namespace["cache"], namespace["inputs"]
    assert cache.get_seq_length() >= inputs["input_ids"].shape[1]  # generate used the quantized cache
    assert "'nominal': 3.0" in out  # K4V2 on every layer
    assert f"darwinfront-howto-job 1 trials; front:\n[0.12, 4096.0] {CANDIDATE}" in out
    assert namespace["hand_made"].layers[1] == (4, 2)
