"""Exports that scale: weights in the model's own dtype, a plain tar that reloads, the hash of the bytes served,
a streamed and checked download, and an export that wrote nothing refused."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
import torch
from fastapi.responses import FileResponse
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from darwinfront.client import Client
from darwinfront.core import keys
from darwinfront.core.errors import CandidateNotFound, DarwinfrontError
from darwinfront.core.spec import ModelSpec
from workers import artifacts, modeling, slicing, transfer
from workers.pruned_hf import export

pytest_plugins = ["service_fixtures"]
GOOD = {"model": {"source": "builtin:micro-llama"}, "prune": {"targets": [0.5]}}


def _sliced(dtype: torch.dtype = torch.float32):
    """A tied random Llama cut to one KV group and half its MLP, in `dtype`."""
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).to(dtype).eval()
    layout = slicing.Layout(tuple(slicing.LayerLayout((1,), tuple(range(0, 128, 2))) for _ in range(2)), "kv_group")
    return dense, slicing.slice_model(dense, layout)


def _stored(folder: Path) -> set[torch.dtype]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {f.get_tensor(k).dtype for k in list(f.keys())}


def test_weights_are_written_in_the_dtype_asked_and_the_dense_model_is_not_cast(tmp_path):
    dense, model = _sliced(torch.float32)
    slicing.save_pruned(model, None, tmp_path / "fp32")
    slicing.save_pruned(model, None, tmp_path / "bf16", dtype=torch.bfloat16)
    assert _stored(tmp_path / "fp32") == {torch.float32} and _stored(tmp_path / "bf16") == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # half the bytes: the tied embedding is saved once, not once per name
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "bf16")}
    assert size["bf16"] < 0.52 * size["fp32"]
    assert {p.dtype for p in dense.parameters()} == {torch.float32}  # only the saved copy was cast
    loaded = export.load(tmp_path / "bf16", dtype=torch.bfloat16)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    state = model.state_dict()
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert all(torch.equal(f.get_tensor(k), state[k].to(torch.bfloat16)) for k in list(f.keys()))


@pytest.mark.parametrize(("stored", "ran", "written"), [
    (torch.bfloat16, "float32", torch.bfloat16),  # a bf16 checkpoint searched in fp32 is written in bf16
    (torch.float32, "float32", torch.float32),
    (torch.float32, "bfloat16", torch.bfloat16),  # never wider than what was scored
    (torch.float16, "float16", torch.float16),
])
def test_an_export_takes_the_source_checkpoints_dtype(tmp_path, stored, ran, written):
    dense, _ = _sliced(stored)
    dense.save_pretrained(tmp_path / "source")
    assert modeling.stored_dtype(str(tmp_path / "source")) == stored
    assert modeling.export_dtype(ModelSpec(source=str(tmp_path / "source"), dtype=ran)) == written


def test_the_archive_is_a_plain_tar_that_reloads_with_load_pruned(tmp_path, micro_dir):
    from transformers import AutoTokenizer

    _, model = _sliced(torch.bfloat16)
    slicing.save_pruned(model, AutoTokenizer.from_pretrained(micro_dir), tmp_path / "export")
    meta = artifacts.archive(tmp_path / "data", "job", "c1", tmp_path / "export")
    path = tmp_path / "data" / "artifacts" / meta["path"]
    assert path.read_bytes()[:2] != b"\x1f\x8b"  # not gzip
    with tarfile.open(path, "r:") as tar:  # uncompressed
        assert meta["files"] == len(tar.getnames()) and "c1/model.safetensors" in tar.getnames()
        tar.extractall(tmp_path / "out", filter="data")
    loaded = slicing.load_pruned(tmp_path / "out" / "c1", dtype=torch.bfloat16)[0]
    assert slicing.count_parameters(loaded) == slicing.count_parameters(model)
    assert _stored(tmp_path / "out" / "c1") == {torch.bfloat16}


def test_files_larger_than_a_chunk_travel_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 1000)
    (tmp_path / "export" / "sub").mkdir(parents=True)
    payload = bytes(range(256)) * 37  # 9,472 bytes: ten chunks, the last one short
    (tmp_path / "export" / "sub" / "weights.bin").write_bytes(payload)
    (tmp_path / "export" / "config.json").write_text("{}")
    meta = artifacts.archive(tmp_path / "data", "job", "c", tmp_path / "export")
    with tarfile.open(tmp_path / "data" / "artifacts" / meta["path"]) as tar:
        assert tar.extractfile("c/sub/weights.bin").read() == payload
    reader = transfer.ChunkReader(iter([b"abc", b"defg"]))
    assert (reader.read(5), reader.read(), reader.read(1)) == (b"abcde", b"fg", b"")
    copied = tmp_path / "copy"
    copied.mkdir()
    assert transfer.fetch(transfer.Located(None, str(tmp_path / "export")), copied) == len(payload) + 2
    assert (copied / "sub" / "weights.bin").read_bytes() == payload


def test_a_file_that_shrinks_while_it_travels_leaves_no_archive(tmp_path, monkeypatch):
    (tmp_path / "export").mkdir()
    weights = tmp_path / "export" / "c.tar"
    weights.write_bytes(b"x" * 5000)
    where = transfer.Located(None, str(tmp_path / "export"))
    listed = transfer.listing(where)
    weights.write_bytes(b"x" * 10)  # changed after it was listed
    with pytest.raises(OSError):
        list(transfer.chunks(where, "c.tar", listed[0][1]))
    monkeypatch.setattr(transfer, "listing", lambda _: listed)
    with pytest.raises(OSError):
        artifacts.take(tmp_path / "data", "job", "c", where, through_ray=True)
    assert not list((tmp_path / "data" / "artifacts" / "job").iterdir())


def test_an_empty_export_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for where in (transfer.Located(None, str(tmp_path / "empty")), transfer.Located(None, str(tmp_path / "gone"))):
        with pytest.raises(RuntimeError, match="wrote no archive"):
            artifacts.take(tmp_path / "data", "job", "c", where)


def _served(api_client, store, settings, tmp_path) -> tuple[str, dict]:
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    _, model = _sliced()
    slicing.save_pruned(model, None, tmp_path / "export")
    meta = artifacts.archive(settings.data_dir, job_id, "c1", tmp_path / "export")
    store.put_artifact(job_id, "c1", meta)
    return job_id, meta


def test_the_served_hash_is_the_sha256_of_the_bytes_served_and_is_kept(api_client, store, service_settings,
                                                                           tmp_path):
    job_id, meta = _served(api_client, store, service_settings, tmp_path)
    assert meta["sha256"] is None  # moved into place by its exporter: hashed on its first download
    response = api_client.get(f"/v1/jobs/{job_id}/candidates/c1/model")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    digest = hashlib.sha256(response.content).hexdigest()
    assert digest == response.headers["x-checksum-sha256"] and len(response.content) == meta["size"]
    assert store.get_artifact(job_id, "c1") == {**meta, "sha256": digest}
    store._r.delete(keys.artifacts(job_id))  # its record gone (say, cleaned up) while a download hashed it
    assert store.add_artifact_checksum(job_id, "c1", digest) is None  # a record gone meanwhile stays gone
    with pytest.raises(CandidateNotFound):
        store.get_artifact(job_id, "c1")


def test_downloads_stream_from_disk_and_the_client_checks_the_hash(api_client, store, service_settings, tmp_path):
    import asyncio

    from service.routes import candidates

    job_id, meta = _served(api_client, store, service_settings, tmp_path)
    job = store.get(job_id)
    answer = asyncio.run(candidates.get_model(job, "c1", store, service_settings))
    # the API hands the file to the server to send in chunks; it never reads the archive itself
    assert isinstance(answer, FileResponse) and answer.chunk_size < meta["size"]
    client = Client("http://testserver", "unused")
    client.http = api_client
    out = client.download_model(job_id, "c1", tmp_path / "got.tar")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == store.get_artifact(job_id, "c1")["sha256"]
    archived = service_settings.artifacts_dir / meta["path"]
    archived.write_bytes(archived.read_bytes()[:-1] + b"!")  # corrupted on the server's disk
    with pytest.raises(DarwinfrontError, match="does not match its SHA-256"):
        client.download_model(job_id, "c1", tmp_path / "bad.tar")
    assert not (tmp_path / "bad.tar").exists()
