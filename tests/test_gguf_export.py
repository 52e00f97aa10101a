"""GGUF export of pruned candidates (llama.cpp's `deci` architecture), without llama.cpp: the per-layer arrays are the
candidate's widths (with the zero stand-ins `deci` needs), the tensors are the sliced weights in llama.cpp's rotary
order, a numpy forward of the file as `deci` runs it gives the PyTorch logits, Q8_0 stays within its rounding of
f16, the tokenizer metadata is the tokenizer's, and the REST route and `download --gguf` serve it.

`test_llama_cpp.py` (integration) runs the files in llama.cpp itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from deci_reference import forward, read
from gguf import GGMLQuantizationType as QT
from test_pruned_export import odd_layout

from darwinfront.gguf_export import deci, vocab, write_gguf
from workers import artifacts, reference, slicing

pytest_plugins = ["service_fixtures"]
torch.set_num_threads(1)

TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.getcwd())\n"] * 4
SAMPLE = "def g(os):\n    return f(os.getcwd()) + 1"


@pytest.fixture(scope="module")
def tokenizer():
    return reference.train_tokenizer(TEXTS, 300)


def small_model(kind: str, tokenizer):
    """Three layers, 4 query heads on 2 KV heads of 16, MLP 96: `llama` (tied), `llama3` (tied, Llama 3's rotary
    scaling with an original context of 32, so every branch of it acts), `llama_bias` (q/k/v/o and MLP biases,
    untied), `qwen2` (q/k/v biases, untied) or `phi3` (fused projections, split by its adapter when cut; untied);
    norms and biases drawn away from their init."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=128,
                  initializer_range=0.1, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
    elif kind == "phi3":
        model = Phi3ForCausalLM(Phi3Config(tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, **common))
    else:
        bias = kind == "llama_bias"
        config = LlamaConfig(tie_word_embeddings=not bias, attention_bias=bias, mlp_bias=bias, **common)
        if kind == "llama3":
            config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5) if "norm" in name else param.normal_(0.0, 0.1)
    return model.eval()


def pruned(kind: str, unit: str, tokenizer, folder: Path, *, shifts: bool = False, layout=None):
    """`small_model` cut to `layout` (default `odd_layout`: layer 0 uneven, layer 1 no attention, layer 2 no MLP),
    with `shifts` an output bias on layer 0's attention and on the removed sub-blocks; saved to `folder`."""
    model = small_model(kind, tokenizer)
    slicing.slice_model(model, layout or odd_layout(model, unit))
    if shifts:
        generator = torch.Generator().manual_seed(2)
        for i, block in ((0, "attn"), (1, "attn"), (2, "mlp")):
            slicing.add_output_shift(model.model.layers[i], block, torch.randn(64, generator=generator))
    slicing.save_pruned(model, tokenizer, folder)
    return model


def logits(model, tokenizer) -> tuple[list[int], np.ndarray]:
    ids = tokenizer(SAMPLE)["input_ids"]
    with torch.no_grad():
        return ids, model(input_ids=torch.tensor([ids])).logits[0].numpy()  # (T, vocab)


def test_the_per_layer_arrays_are_the_candidates_widths(tokenizer, tmp_path):
    cases = {  # (head_count, head_count_kv, feed_forward_length) as written
        ("kv_group", False): ([2, 0, 4], [1, 0, 2], [48, 10, 32]),  # layer 2's removed MLP: a zero one of 32
        ("q_head", True): ([3, 1, 4], [3, 1, 2], [48, 10, 32]),  # 3 heads on [0, 0, 1]: a KV head each; layer 1's
    }                                                            # biased removed attention: one zero head
    for (unit, shifts), expected in cases.items():
        folder = tmp_path / f"{unit}-{shifts}"
        pruned("llama", unit, tokenizer, folder, shifts=shifts)
        summary = write_gguf(folder, tmp_path / f"{unit}.gguf", "f16")
        meta, tensors = read(tmp_path / f"{unit}.gguf")
        got = tuple(meta[f"deci.{k}"] for k in ("attention.head_count", "attention.head_count_kv",
                                                 "feed_forward_length"))
        assert got == expected and (summary["head_count"], summary["head_count_kv"],
                                    summary["feed_forward_length"]) == expected
        assert meta["general.architecture"] == "deci" and meta["deci.block_count"] == 3
        assert (meta["deci.embedding_length"], meta["deci.attention.key_length"], meta["deci.rope.dimension_count"]) \
            == (64, 16, 16)
        heads, kv_heads, ffn = expected
        for i in range(3):
            assert (f"blk.{i}.attn_q.weight" in tensors) == (heads[i] > 0)
            if heads[i]:
                assert tensors[f"blk.{i}.attn_q.weight"].shape == (heads[i] * 16, 64)
                assert tensors[f"blk.{i}.attn_k.weight"].shape == (kv_heads[i] * 16, 64)
                assert tensors[f"blk.{i}.attn_output.weight"].shape == (64, heads[i] * 16)
            assert tensors[f"blk.{i}.ffn_down.weight"].shape == (64, ffn[i])
        assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


def test_layer_zero_without_attention_and_a_layer_without_either(tokenizer, tmp_path):
    """llama.cpp reads the head size only when layer 0 has heads, so a headless layer 0 gets one zero head; a layer
    with neither block keeps `head_count` and `feed_forward_length` 0 (deci passes its input on)."""
    layout = slicing.Layout((slicing.LayerLayout((), tuple(range(40))), slicing.LayerLayout((), ()),
                             slicing.LayerLayout((0, 1), tuple(range(96)))), "kv_group")
    model = pruned("llama", "kv_group", tokenizer, tmp_path / "m", layout=layout)
    write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["deci.attention.head_count"] == [1, 0, 4] and meta["deci.feed_forward_length"] == [40, 0, 96]
    assert not tensors["blk.0.attn_v.weight"].any() and not tensors["blk.0.attn_output.weight"].any()
    assert not any(name.startswith("blk.1.") for name in tensors)
    ids, expected = logits(model, tokenizer)
    assert np.abs(forward(tmp_path / "m.gguf", ids) - expected).max() < 1e-4


def test_tensors_are_the_sliced_weights_in_llama_cpps_rotary_order(tokenizer, tmp_path):
    model = pruned("qwen2", "q_head", tokenizer, tmp_path / "m", shifts=True)
    write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    _, tensors = read(tmp_path / "m.gguf")
    layers = model.model.layers

    def hf(t):
        return t.detach().numpy()

    def unpermute(array, heads):  # the inverse of deci.permute_rotary
        return array.reshape(heads, array.shape[0] // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(
            array.shape)

    np.testing.assert_array_equal(unpermute(tensors["blk.2.attn_q.weight"], 4), hf(layers[2].self_attn.q_proj.weight))
    np.testing.assert_array_equal(unpermute(tensors["blk.2.attn_k.bias"], 2), hf(layers[2].self_attn.k_proj.bias))
    assert not np.array_equal(tensors["blk.2.attn_q.weight"], hf(layers[2].self_attn.q_proj.weight))
    k = hf(layers[0].self_attn.k_proj.weight).reshape(2, 16, 64)[[0, 0, 1]].reshape(48, 64)  # a KV head per query
    np.testing.assert_array_equal(unpermute(tensors["blk.0.attn_k.weight"], 3), k)
    v = hf(layers[0].self_attn.v_proj.weight).reshape(2, 16, 64)[[0, 0, 1]].reshape(48, 64)
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight"], v)
    np.testing.assert_array_equal(tensors["blk.0.attn_output.bias"], hf(layers[0].self_attn.o_proj.bias))
    np.testing.assert_array_equal(tensors["blk.1.attn_output.bias"], hf(layers[1].self_attn.o_bias))
    assert not tensors["blk.1.attn_output.weight"].any() and tensors["blk.1.attn_output.weight"].shape == (64, 16)
    np.testing.assert_array_equal(tensors["blk.2.ffn_down.bias"], hf(layers[2].mlp.down_bias))
    assert not tensors["blk.2.ffn_down.weight"].any()
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate.weight"], hf(layers[1].mlp.gate_proj.weight))
    np.testing.assert_array_equal(tensors["output.weight"], hf(model.lm_head.weight))


@pytest.mark.parametrize("kind", ["llama", "llama3", "llama_bias", "qwen2", "phi3"])
def test_the_file_run_as_deci_gives_the_candidates_logits(kind, tokenizer, tmp_path):
    model = pruned(kind, "q_head", tokenizer, tmp_path / "m", shifts=True)
    ids, expected = logits(model, tokenizer)
    scale = np.abs(expected).max()
    for gguf_type, tolerance in (("f32", 1e-5), ("f16", 5e-3), ("q8_0", 5e-2)):
        path = tmp_path / f"m.{gguf_type}.gguf"
        write_gguf(tmp_path / "m", path, gguf_type)
        error = np.abs(forward(path, ids) - expected).max() / scale
        assert error < tolerance, (gguf_type, error)
    factors = read(tmp_path / "m.f32.gguf")[1].get("rope_freqs.weight")
    if kind == "llama3":  # wavelengths 2π·10000^(j/16): below 32/4 kept, above 32 divided by 8, blended between
        smooth = (32 / (2 * np.pi * 10000 ** (2 / 16)) - 1) / 3
        np.testing.assert_allclose(factors, [1.0, 1 / ((1 - smooth) / 8 + smooth)] + [8.0] * 6, rtol=1e-6)
    else:
        assert factors is None
    unpermuted = tmp_path / "wrong.gguf"  # the check can fail: q/k rows left in Hugging Face order differ
    original = deci.permute_rotary
    try:
        deci.permute_rotary = lambda array, heads: array
        write_gguf(tmp_path / "m", unpermuted, "f32")
    finally:
        deci.permute_rotary = original
    assert np.abs(forward(unpermuted, ids) - expected).max() / scale > 1e-3


def test_q8_0_is_f16_within_its_rounding(tokenizer, tmp_path):
    pruned("llama_bias", "q_head", tokenizer, tmp_path / "m", shifts=True)
    write_gguf(tmp_path / "m", tmp_path / "f16.gguf", "f16")
    summary = write_gguf(tmp_path / "m", tmp_path / "q8.gguf", "q8_0")
    half = {t.name: t for t in gguf.GGUFReader(tmp_path / "f16.gguf").tensors}
    quantized = 0
    for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors:
        reference_values = gguf.quants.dequantize(np.asarray(half[t.name].data), half[t.name].tensor_type)
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(reference_values.shape)
        if len(t.shape) == 1:
            assert t.tensor_type == QT.F32 and np.array_equal(values, reference_values)
        elif t.shape[0] % 32:  # rows that do not split into blocks of 32 (3 heads of 16) stay f16
            assert t.tensor_type == QT.F16 and np.array_equal(values, reference_values)
        else:
            assert t.tensor_type == QT.Q8_0
            blocks = reference_values.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # one Q8_0 step per block of 32
            # half a step of rounding, plus f16's own rounding of the values and of the block's scale
            assert (np.abs(values.reshape(-1, 32) - blocks) <= step * 0.65 + 1e-7).all(), t.name
            assert not np.array_equal(values, reference_values) or not values.any()  # (the zero stand-ins)
            quantized += 1
    assert quantized == summary["tensor_types"]["Q8_0"] > 10
    assert (tmp_path / "q8.gguf").stat().st_size < 0.7 * (tmp_path / "f16.gguf").stat().st_size


def test_the_tokenizer_metadata_is_the_tokenizers(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    pruned("llama", "kv_group", tokenizer, tmp_path / "m")
    write_gguf(tmp_path / "m", tmp_path / "m.gguf")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    saved = AutoTokenizer.from_pretrained(tmp_path / "m")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens == [saved.convert_ids_to_tokens(i) for i in range(len(saved))]
    types = fields["tokenizer.ggml.token_type"].contents()
    special = set(saved.all_special_ids)
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(special)
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in special)
    merges = json.loads((tmp_path / "m" / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == saved.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == saved.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False


def test_pre_tokenizers_are_named_as_llama_cpp_names_them_or_refused():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert vocab.pre_tokenizer_name(byte_level) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert vocab.pre_tokenizer_name(smollm) == "smollm"
    split = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "x"}},
                                                   {**byte_level, "use_regex": False}]}
    for other in (split, {"type": "Metaspace", "replacement": "▁"}, {**byte_level, "add_prefix_space": True}, None):
        with pytest.raises(ValueError, match="the GGUF export knows llama.cpp's split only for"):
            vocab.pre_tokenizer_name(other)


def test_a_dense_directory_exports_with_uniform_widths(tokenizer, tmp_path):
    model = small_model("llama_bias", tokenizer)
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    summary = write_gguf(tmp_path / "dense", tmp_path / "dense.gguf", "f32")
    assert (summary["head_count"], summary["head_count_kv"], summary["feed_forward_length"]) == \
        ([4] * 3, [2] * 3, [96] * 3)
    ids, expected = logits(model, tokenizer)
    assert np.abs(forward(tmp_path / "dense.gguf", ids) - expected).max() < 1e-4


def test_what_cannot_be_exported_is_refused_naming_it(tokenizer, tmp_path):
    pruned("llama", "kv_group", tokenizer, tmp_path / "m")
    with pytest.raises(ValueError, match="gguf_type 'q4_0': expected one of f32, f16, q8_0"):
        write_gguf(tmp_path / "m", tmp_path / "x.gguf", "q4_0")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for change, words in (({"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5}},
                           "rope_type 'yarn'"), ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                          ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 0.75}}, "partial_rotary_factor 0.75"),
                          ({"model_type": "gpt2"}, "model_type 'gpt2'")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=words):
            write_gguf(tmp_path / "m", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*x.gguf*"))  # nothing half-written


def _stored_candidate(store, settings, tokenizer, tmp_path, job_id: str, candidate_id: str) -> None:
    pruned("llama", "q_head", tokenizer, tmp_path / candidate_id, shifts=True)
    meta = artifacts.archive(settings.data_dir, job_id, candidate_id, tmp_path / candidate_id)
    store.put_artifact(job_id, candidate_id, meta)


def test_the_rest_route_serves_the_gguf_of_a_stored_archive(api_client, store, service_settings, tokenizer, tmp_path):
    job_id = api_client.post("/v1/jobs", json={"model": {"source": "builtin:tiny-llama"}}).json()["id"]
    _stored_candidate(store, service_settings, tokenizer, tmp_path, job_id, "t0-g1-c0")
    url = f"/v1/jobs/{job_id}/candidates/t0-g1-c0/gguf"
    response = api_client.get(url, params={"type": "q8_0"})
    assert response.status_code == 200, response.text
    assert 't0-g1-c0.q8_0.gguf' in response.headers["content-disposition"]
    (tmp_path / "got.gguf").write_bytes(response.content)
    meta, _ = read(tmp_path / "got.gguf")
    assert meta["deci.attention.head_count"] == [3, 1, 4]
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    kept = service_settings.artifacts_dir / job_id / "t0-g1-c0.q8_0.gguf"
    assert kept.read_bytes() == response.content  # converted once, kept beside the archive
    assert api_client.get(url, params={"type": "q8_0"}).content == response.content
    assert api_client.get(url).headers["content-disposition"].endswith('t0-g1-c0.f16.gguf"')  # f16 by default

    bad = api_client.get(url, params={"type": "q4_k"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "type"
    missing = api_client.get(f"/v1/jobs/{job_id}/candidates/t0-g9-c9/gguf")
    assert missing.status_code == 404
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("no model here")
    store.put_artifact(job_id, "junk", artifacts.archive(service_settings.data_dir, job_id, "junk", tmp_path / "junk"))
    refused = api_client.get(f"/v1/jobs/{job_id}/candidates/junk/gguf")
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "gguf_unsupported"
    assert "not an archive of one model directory" in refused.json()["error"]["message"]
    (service_settings.artifacts_dir / job_id / "cut.tar").write_bytes(b"\x1f\x8b not a tar at all")
    store.put_artifact(job_id, "cut", {"path": f"{job_id}/cut.tar", "size": 20, "sha256": ""})
    cut = api_client.get(f"/v1/jobs/{job_id}/candidates/cut/gguf")
    assert cut.status_code == 422 and "cut.tar is not a readable model archive" in cut.json()["error"]["message"]


def test_download_gguf_from_the_command_line(tokenizer, tmp_path):
    import redis

    from darwinfront.cli import main
    from darwinfront.core.store import JobStore
    from darwinfront.stack import EmbeddedStack

    with EmbeddedStack(tmp_path / "stack", port=0, driver=False) as stack:
        store = JobStore(redis.Redis.from_url(stack.redis_url, decode_responses=True))
        job = store.create("local", {"model": {"source": "builtin:tiny-llama"}})
        store.put_result(job.id, "t0-g1-c0", {"candidate_id": "t0-g1-c0"})
        _stored_candidate(store, stack.settings, tokenizer, tmp_path, job.id, "t0-g1-c0")
        args = ["--url", stack.url, "--key", stack.key, "download", job.id, "t0-g1-c0", "-o", str(tmp_path / "out")]
        assert main([*args, "--gguf", "--gguf-type", "q8_0"]) == 0
    meta, _ = read(tmp_path / "out" / "t0-g1-c0.q8_0.gguf")
    assert meta["deci.feed_forward_length"] == [48, 10, 32]


def test_the_module_command_converts_a_directory(tokenizer, tmp_path, capsys):
    from darwinfront.gguf_export.__main__ import main

    pruned("llama", "kv_group", tokenizer, tmp_path / "m")
    assert main([str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert json.loads(capsys.readouterr().out)["tensor_types"]["Q8_0"] > 0
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x.gguf")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}")  # weights without the tensors
    assert main([str(tmp_path / "m"), str(tmp_path / "x.gguf")]) == 2
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "x.gguf").exists()


def test_the_export_needs_no_torch(tokenizer, tmp_path):
    """The API converts archives itself, and its image has no torch."""
    import subprocess
    import sys

    pruned("llama", "q_head", tokenizer, tmp_path / "m", shifts=True)
    code = ("import sys; import service.routes.candidates; from darwinfront.gguf_export import write_gguf; "
            f"write_gguf({str(tmp_path / 'm')!r}, {str(tmp_path / 'm.gguf')!r}, 'q8_0'); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]"] and (tmp_path / "m.gguf").is_file()
