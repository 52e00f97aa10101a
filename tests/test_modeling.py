"""Loading: sources, devices, dtypes and the architecture check."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from darwinfront.core.errors import InvalidSpec
from workers import modeling

torch.set_num_threads(1)


def test_resolve_device():
    assert modeling.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert modeling.resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(InvalidSpec, match="CUDA is not available") as info:
            modeling.resolve_device("cuda")
        assert info.value.field == "model.device"
    with pytest.raises(InvalidSpec, match="unknown device 'tpu9'"):
        modeling.resolve_device("tpu9")


def test_resolve_dtype():
    assert modeling.resolve_dtype("bfloat16") is torch.bfloat16
    assert modeling.resolve_dtype("fp16") is torch.float16
    assert modeling.resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(InvalidSpec, match="unknown dtype 'int3'"):
        modeling.resolve_dtype("int3")


def test_resolve_source(tmp_path, micro_dir):
    assert modeling.resolve_source("builtin:micro-llama") == str(micro_dir)
    assert modeling.resolve_source(str(micro_dir)) == str(micro_dir)
    assert modeling.resolve_source("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id passes through
    with pytest.raises(InvalidSpec, match="has no config.json") as info:
        modeling.resolve_source(str(tmp_path))
    assert info.value.field == "model.source"
    with pytest.raises(InvalidSpec, match="not a model directory"):
        modeling.resolve_source(str(tmp_path / "missing"))
    with pytest.raises(InvalidSpec, match="unknown builtin model 'huge-llama'"):
        modeling.resolve_source("builtin:huge-llama")


def test_load_model_eval_mode_dtype_and_tokenizer(micro_dir):
    model, tokenizer = modeling.load_model(str(micro_dir), device="cpu")
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.pad_token is not None and tokenizer.eos_token_id == model.config.eos_token_id
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()

    bf16, _ = modeling.load_model("builtin:micro-llama", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    bf16_logits = bf16(input_ids=ids).logits.float()
    assert (bf16_logits.argmax(-1) == logits.argmax(-1)).float().mean() > 0.5


def test_check_architecture_accepts_llama_family():
    from transformers import MistralConfig, MistralForCausalLM

    modeling.check_architecture(tiny_model("llama_gqa"))
    modeling.check_architecture(tiny_model("qwen2_bias"))
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48,
    ))
    modeling.check_architecture(mistral)


def test_check_architecture_refuses_other_layouts():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(InvalidSpec, match="architecture GPT2LMHeadModel is not supported"):
        modeling.check_architecture(gpt2)
    broken = tiny_model("llama_gqa")
    broken.model.layers[1].mlp = nn.Identity()
    with pytest.raises(InvalidSpec, match="layer 1 mlp lacks linear gate_proj, up_proj, down_proj"):
        modeling.check_architecture(broken)
