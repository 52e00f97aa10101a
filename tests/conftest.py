"""Shared fixtures: the trained micro reference model, and tiny random Llama-family models for surgery tests.

`pytest_configure` first points every directory the code would derive from HOME at a folder of this session, so
tests never write to ~/.cache, ~/.local, ~/.config or ~/.ray.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

_SCRATCH = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """Set the session's directories in the environment, before any test module is imported (and so before
    `Settings`, the CLI or a driver subprocess reads them).

    An externally set `DARWINFRONT_CACHE_DIR` is kept: CI builds the reference models once per run there, and dev
    sessions share one. The data directory is always this session's own. Matplotlib's config and Ray's auth token
    (`~/.config/matplotlib`, `~/.ray/auth_token` otherwise) go here too, unless set already.
    """
    scratch = Path(tempfile.mkdtemp(prefix="darwinfront-tests-"))
    config.stash[_SCRATCH] = scratch
    os.environ.setdefault("DARWINFRONT_CACHE_DIR", str(scratch / "cache"))
    os.environ["DARWINFRONT_DATA_DIR"] = str(scratch / "data")
    os.environ.setdefault("MPLCONFIGDIR", str(scratch / "matplotlib"))
    if not any(os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")):
        token = scratch / "ray_auth_token"  # a local Ray would otherwise make ~/.ray/auth_token
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


def pytest_unconfigure(config: pytest.Config) -> None:
    scratch = config.stash.get(_SCRATCH, None)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)

SURGERY_KINDS = ("llama_gqa", "llama_mha", "llama_bias", "qwen2_bias", "qwen3", "gemma2", "gemma3", "phi3",
                 "olmo2", "mixtral", "qwen3_moe", "olmoe", "gpt_neox")


def tiny_model(kind: str = "llama_gqa", seed: int = 0):
    """A randomly initialised tiny causal LM built from a config (no training, no download).

    Kinds: `llama_gqa` (4 query heads on 2 KV heads, tied embeddings), `llama_mha` (4 heads, 4 KV heads),
    `llama_bias` (GQA with attention and MLP biases), `qwen2_bias` (Qwen2: q/k/v biases, untied embeddings),
    `qwen3` (per-head q/k norms, GQA, untied), `gemma2` (GeGLU, pre/post norms, soft-capping, sliding-window
    layers of 4 tokens between global ones, tied) and `gemma3` (Gemma 2's layout with per-head q/k norms, a
    sliding, a global and a sliding layer), `phi3` (fused qkv_proj and gate_up_proj, as stock Phi-3 stores
    them: `family_of` splits them on first use; half of each head rotated, as in Phi-4-mini) and `olmo2` (q/k
    norms over the whole projections, norms after each sub-layer, untied). Weights are drawn
    wider than the usual init and biases are non-zero, so every unit visibly matters.
    """
    import transformers

    common = dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, head_dim=8,
        intermediate_size=48, max_position_embeddings=64, initializer_range=0.15,
    )
    gqa = dict(num_key_value_heads=2)
    window = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    moe = dict(num_experts_per_tok=2)
    name, extra = {
        "llama_gqa": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
        "llama_mha": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
        "llama_bias": ("Llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                     tie_word_embeddings=False)),
        "qwen2_bias": ("Qwen2", dict(**gqa, tie_word_embeddings=False)),
        "qwen3": ("Qwen3", dict(**gqa, tie_word_embeddings=False)),
        "gemma2": ("Gemma2", dict(**gqa, **window)),
        "gemma3": ("Gemma3", dict(**gqa, **window)),
        "olmo2": ("Olmo2", dict(**gqa, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "phi3": ("Phi3", dict(**gqa, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.5})),
        # mixtures of experts: 6 experts of 8 channels (48 in all, as the dense kinds' MLP), 2 per token
        "mixtral": ("Mixtral", dict(**gqa, **moe, intermediate_size=8, num_local_experts=6)),
        "qwen3_moe": ("Qwen3Moe", dict(**gqa, **moe, moe_intermediate_size=8, num_experts=6, norm_topk_prob=False,
                                       tie_word_embeddings=False)),
        "olmoe": ("Olmoe", dict(**gqa, **moe, intermediate_size=8, num_experts=6, norm_topk_prob=True,
                                tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        # multi-head (no GQA in the family), fused interleaved QKV, a quarter of each head rotated, parallel residual
        "gpt_neox": ("GPTNeoX", dict(tie_word_embeddings=False, use_parallel_residual=True, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2)),
        "gpt_neox_sequential": ("GPTNeoX", dict(tie_word_embeddings=False, use_parallel_residual=False,
                                                pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    }[kind]
    config_class = getattr(transformers, "Gemma3TextConfig" if name == "Gemma3" else f"{name}Config")
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(config_class(**{**common, **extra}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            elif kind in ("olmo2", "olmoe") and name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)  # each row its own scale, so a cut must keep the right rows
    return model.eval()


def unit_space(model, mlp_step: int, attention_unit: str = "kv_group"):
    """The level space of `model` with one attention unit and `mlp_step` channels per level step (in a mixture of
    experts, the experts those channels make: the tiny ones' experts are 8 channels wide)."""
    from workers import levels, slicing

    return levels.level_space(model, _unit_table(slicing.dims(model), mlp_step, attention_unit))


def _unit_table(d, mlp_step: int, attention_unit: str):
    from workers import levels

    return levels.LevelTable(d.attn_units(attention_unit), 1, d.mlp_units, max(1, mlp_step // d.mlp_width),
                             attention_unit, d.mlp_unit)


def layout_of(genome, scores, mlp_step: int, attention_unit: str = "kv_group", model=None):
    """The layout that keeps each layer's highest-scored units (ties to the lower index), one attention unit and
    `mlp_step` channels per level step: what a level database filled by `scores` gives. With `model`, its MLP
    units (experts where it has them) and steps as `unit_space` counts them."""
    from workers import levels, slicing

    first = scores.layers[0]
    table = (_unit_table(slicing.dims(model), mlp_step, attention_unit) if model is not None else
             levels.LevelTable(len(first.attn), 1, len(first.mlp), mlp_step, attention_unit))
    return levels.layout(genome, levels.removal_orders(scores), table)


@pytest.fixture
def random_llama():
    """A randomly initialised tiny GQA Llama (3 layers, 2 KV groups of 2 query heads, MLP width 48)."""
    return tiny_model("llama_gqa")


@pytest.fixture(params=SURGERY_KINDS)
def surgery_kind(request) -> str:
    """Each tiny random architecture the slicer must handle (build it with `tiny_model(kind)`): GQA Llama, MHA
    Llama, Llama with attention and MLP biases, Qwen2 with q/k/v biases, Qwen3, Gemma 2 and Gemma 3."""
    return request.param


@pytest.fixture(scope="session")
def micro_dir():
    """The trained builtin:micro-llama directory, built once into $DARWINFRONT_CACHE_DIR (CI's, or this session's)."""
    from workers.reference import builtin_model_dir

    return builtin_model_dir("micro-llama")


@pytest.fixture
def micro_model(micro_dir):
    """A fresh (model, tokenizer) of builtin:micro-llama on the CPU, float32, eval mode."""
    from workers.modeling import load_model

    return load_model(str(micro_dir), device="cpu")
