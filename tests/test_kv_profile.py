"""The per-layer K/V sensitivity profile on a tiny random-init GQA Llama, and profile -> prune -> cluster."""

import json

import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from search.kv_space import build_space, pareto_pairs
from workers.kv.profile import attention_output, capture_attention, profile_kv

L = 4


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=L,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the 0.02-std init gives, so that keys matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _model()


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def table(model, calibration) -> dict:
    return profile_kv(model, calibration, batch_size=2)


def test_attention_output_matches_sdpa_with_gqa():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 8, generator=gen) for h in (6, 2, 2))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(attention_output(q, k, v, 8**-0.5), ref, atol=1e-5)
    # The last 3 queries against all 9 keys: the bottom rows of the full causal attention.
    assert torch.allclose(attention_output(q[..., 6:, :], k, v, 8**-0.5), ref[..., 6:, :], atol=1e-5)


def test_attention_output_with_a_window_and_a_soft_cap_matches_an_explicit_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 7, 8, generator=gen) * 3 for h in (4, 2, 2))
    window, cap, scaling = 3, 2.0, 8**-0.5
    positions = torch.arange(7)
    visible = (positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - window)
    scores = cap * torch.tanh(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * scaling / cap)
    want = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.repeat_interleave(2, dim=1)
    got = attention_output(q, k, v, scaling, window=window, softcap=cap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, attention_output(q, k, v, scaling), atol=1e-3)  # both change the output
    # The last 2 queries against all 7 keys: the bottom rows of the full windowed attention.
    torch.testing.assert_close(attention_output(q[..., 5:, :], k, v, scaling, window=window, softcap=cap),
                               want[..., 5:, :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_capture_sees_each_layer_s_window_and_soft_cap_and_keeps_the_forward(kind):
    from conftest import tiny_model

    model = tiny_model(kind)
    before = model.config._attn_implementation
    seen = {}

    def record(layer_idx, q, k, v, scaling, window, softcap):
        seen[layer_idx] = (window, softcap)

    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with capture_attention(model, record):
            captured = model(ids, use_cache=False).logits
    cap = model.config.attn_logit_softcapping if kind == "gemma2" else None
    assert seen == {0: (4, cap), 1: (None, cap), 2: (4, cap)}  # sliding, global, sliding
    torch.testing.assert_close(captured, ref, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == before


def test_capture_sees_the_real_attention_inputs(model, calibration):
    seen = {}

    def record(layer_idx, q, k, v, scaling, window, softcap):
        assert window is None and softcap is None  # Llama has neither
        seen[layer_idx] = (q.shape, k.shape, scaling, attention_output(q, k, v, scaling))

    ids = calibration[:1]
    with torch.no_grad():
        ref = model(ids).logits
        with capture_attention(model, record):
            captured = model(ids, use_cache=False).logits
    assert sorted(seen) == list(range(L))
    assert seen[0][:3] == ((1, 4, 24, 16), (1, 2, 24, 16), 16**-0.5)
    assert torch.allclose(captured, ref, atol=1e-5)  # capturing does not change the forward
    assert model.config._attn_implementation == "sdpa"  # and the implementation is put back


def test_table_is_json_safe_and_complete(table):
    assert json.loads(json.dumps(table)) == table
    assert table["num_layers"] == L and table["sequences"] == 3 and table["tokens"] == 72
    for row in table["layers"]:
        assert len(row["pairs"]) == 9
        bits = [p["bits"] for p in row["pairs"]]
        assert bits == sorted(bits, reverse=True)


def test_errors_grow_as_bits_shrink(table):
    for row in table["layers"]:
        e = {(p["k"], p["v"]): p for p in row["pairs"]}
        assert e[8, 8]["e_o"] < e[4, 4]["e_o"] < e[2, 2]["e_o"]
        assert e[8, 8]["e_k"] < e[4, 8]["e_k"] < e[2, 8]["e_k"]
        assert e[8, 2]["e_k"] == e[8, 8]["e_k"] and e[2, 8]["e_v"] == e[8, 8]["e_v"]


def test_untouched_bits_give_zero_error(model, calibration):
    table = profile_kv(model, calibration[:1], bits=(16,))
    assert all(p["e_o"] == p["e_k"] == p["e_v"] == 0.0 for row in table["layers"] for p in row["pairs"])


def test_a_layer_with_zero_queries_ignores_its_keys(calibration):
    # q = 0 makes every attention row uniform whatever the keys: key bits cannot change that layer's output.
    model = _model()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.zero_()
    table = profile_kv(model, calibration[:2])
    e = [{(p["k"], p["v"]): p["e_o"] for p in row["pairs"]} for row in table["layers"]]
    assert e[1][2, 8] == pytest.approx(e[1][8, 8], rel=1e-5)
    assert e[1][2, 4] == pytest.approx(e[1][8, 4], rel=1e-5)
    assert e[0][2, 8] > 2 * e[0][8, 8]


def test_kivi_mode_quantizes_keys_per_channel_and_values_per_token(model, calibration):
    kivi = profile_kv(model, calibration[:2], mode="kivi", group_size=8)
    per_token = profile_kv(model, calibration[:2], mode="per_token", group_size=8)
    assert kivi["mode"] == "kivi" and kivi["group_size"] == 8
    for row_kivi, row_token in zip(kivi["layers"], per_token["layers"], strict=True):
        for a, b in zip(row_kivi["pairs"], row_token["pairs"], strict=True):
            assert a["e_v"] == b["e_v"]  # the same per-token value quantizer (8-channel groups)
            assert a["e_k"] != b["e_k"]  # keys per channel instead of per token


def test_profile_prune_cluster_yields_a_partition(table):
    space = build_space(table, eps=0.05)
    layers = sorted(layer for g in space.groups for layer in g.layers)
    assert layers == list(range(L))
    for g in space.groups:
        for layer in g.layers:
            row = table["layers"][layer]["pairs"]
            assert list(g.candidates) == pareto_pairs([(p["k"], p["v"], p["e_o"]) for p in row])
    assert space.size() < 9**L
    choice = [len(g.candidates) - 1 for g in space.groups]  # the lowest-bit candidate everywhere
    assert len(space.expand(choice)) == L and space.nominal_bits(choice) <= 4
    # A radius wider than any distance merges exactly the layers whose candidate lists agree.
    wide = build_space(table, eps=10.0)
    assert len(wide.groups) == len({g.candidates for g in space.groups})
