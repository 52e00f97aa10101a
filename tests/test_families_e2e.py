"""A prune job over REST on the embedded stack for families other than Llama's, each from a local directory, OBS
levels: a small Qwen3 (per-head q/k norms, GQA), a small stock Phi-3 (fused qkv_proj and gate_up_proj on disk),
a small Qwen3-MoE (6 experts, 2 per token, pruned by whole experts) and a small stock GPT-NeoX (interleaved fused
QKV, parallel residual, no MLP gate). Its downloaded configuration, applied to the dense model, and its archive,
loaded by stock transformers, give the front's KL; a directory of an unregistered family is a 422 at submission."""

from __future__ import annotations

import json
import tarfile
import time

import httpx
import pytest
from test_families import _local_model

from darwinfront.core.methods import parse_spec
from darwinfront.stack import EmbeddedStack
from workers import fitness, modeling, slicing
from workers.configuration import rebuild
from workers.job_inputs import token_pools

pytestmark = pytest.mark.integration


def spec(source: str) -> dict:
    return {
        "name": "family",
        "model": {"source": source, "device": "cpu"},
        "data": {"calibration_tokens": 512, "train_tokens": 0, "database_tokens": 512, "eval_tokens": 256,
                 "seq_len": 64},
        "prune": {"targets": [0.5], "criterion": "obs", "training_aware": False},
        "search": {"generations": 1, "offspring": 2, "survivors": [1]},
        "seed": 0,
    }


FAMILIES = {"qwen3": "Qwen3", "phi3": "Phi3", "qwen3_moe": "Qwen3Moe", "gpt_neox": "GPTNeoX"}


def test_prune_jobs_download_configurations_and_archives_that_give_the_fronts_kl(tmp_path):
    """One stack for every family's job (submitted together, so they share its Ray workers)."""
    folders = {kind: _local_model(kind, tmp_path / "models" / f"tiny-{kind}") for kind in FAMILIES}  # (allowed root)
    unsupported = tmp_path / "models" / "bloom"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"architectures": ["BloomForCausalLM"]}))
    with EmbeddedStack(tmp_path, port=0) as stack, httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=60
    ) as http:
        refused = http.post("/v1/jobs", json=spec(str(unsupported)))
        assert refused.status_code == 422 and "model.source" in refused.text
        assert "BloomForCausalLM is not supported" in refused.text and "Qwen3ForCausalLM" in refused.text

        jobs = {}
        for kind, folder in folders.items():
            response = http.post("/v1/jobs", json=spec(str(folder)))
            assert response.status_code == 201, response.text
            jobs[kind] = response.json()["id"]
        downloads = {kind: _download(http, job_id, tmp_path / f"download-{kind}") for kind, job_id in jobs.items()}
    for kind, (best, configuration, download) in downloads.items():
        _check(kind, folders[kind], best, configuration, download)


def _download(http: httpx.Client, job_id: str, download) -> tuple[dict, dict, object]:
    """Wait for the job; its lowest-KL front point, that candidate's configuration, and its archive unpacked."""
    deadline = time.monotonic() + 900
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job['status']}: {job['progress']}"
        time.sleep(0.5)
    assert job["status"] == "succeeded", (job["error"], job["progress"])
    best = min(http.get(f"/v1/jobs/{job_id}/front").json()["points"], key=lambda p: p["objectives"]["kl"])
    cid = best["candidate_id"]
    configuration = http.get(f"/v1/jobs/{job_id}/candidates/{cid}/config").json()
    download.mkdir()
    (download / "model.tar").write_bytes(http.get(f"/v1/jobs/{job_id}/candidates/{cid}/model").content)
    with tarfile.open(download / "model.tar") as tar:
        tar.extractall(download, filter="data")
    return best, configuration, download / cid


def _check(kind: str, folder, best: dict, configuration: dict, archive) -> None:
    from transformers import AutoModelForCausalLM

    job_spec = parse_spec(spec(str(folder)))
    dense, tokenizer = modeling.load_model(str(folder), device="cpu")
    calibration = token_pools(tokenizer, job_spec.data, job_spec.seed)["calibration"]
    teacher = fitness.Teacher.of(dense, calibration)
    front_kl = best["objectives"]["kl"]
    assert configuration["parameters"] < 0.8 * slicing.count_parameters(dense), kind

    model, _ = modeling.load_model(str(folder), device="cpu")
    rebuild(model, tokenizer, configuration)  # the README's path, OBS weights included
    assert fitness.kl(model, calibration, teacher) == pytest.approx(front_kl, abs=1e-4), kind

    stock = AutoModelForCausalLM.from_pretrained(archive, trust_remote_code=True).eval()
    assert type(stock).__name__ == f"Pruned{FAMILIES[kind]}ForCausalLM"
    assert slicing.count_parameters(stock) == configuration["parameters"], kind
    assert fitness.kl(stock, calibration, teacher) == pytest.approx(front_kl, abs=1e-4), kind
    if kind == "qwen3_moe":  # the model card counts each layer's kept experts (6 experts of 8 channels)
        card = (archive / "README.md").read_text()
        widths = [shape["intermediate_size"] for shape in stock.config.layer_shapes]
        assert "MLP channels | experts |" in card and min(widths) < 48
        assert all(f"| {width} | {width // 8} |" in card for width in widths)
