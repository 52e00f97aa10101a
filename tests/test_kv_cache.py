"""The mixed-precision KV cache on a tiny random-init GQA Llama: exactness, storage forms, generate, config."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from workers.kv.cache import InvalidKVConfig, KVPrecisionConfig, KVQuantLayer, build_cache, kv_bits

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
L, HEAD_DIM, KV_HEADS = 3, 16, 2


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=L,
                         num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, cache, ids: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Prefill ``ids`` then feed ``steps`` fixed tokens one at a time; all logits, (B, T + steps, vocab)."""
    out = [model(ids, past_key_values=cache).logits]
    for t in _ids(ids.shape[0], steps, seed=99).T:
        out.append(model(t[:, None], past_key_values=cache).logits)
    return torch.cat(out, dim=1)


CONFIGS = {
    "per_token": dict(mode="per_token"),
    "per_token_window": dict(mode="per_token", group_size=8, residual=5),
    "kivi": dict(mode="kivi", group_size=4, residual=8),
}
MIXED = ((4, 2), (8, 4), (2, 16))


def test_16_bit_config_gives_the_dynamic_cache_logits(model):
    ids = _ids(2, 19)
    ref = _logits(model, DynamicCache(config=model.config), ids)
    for storage in ("simulated", "packed"):
        for mode in CONFIGS.values():
            cache = build_cache(model, KVPrecisionConfig.uniform(16, 16, L, **mode), storage,
                                quantize_in_forward=True)
            assert torch.equal(_logits(model, cache, ids), ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("in_forward", [False, True])
def test_packed_and_simulated_give_the_same_logits(model, name, in_forward):
    config = KVPrecisionConfig(layers=MIXED, **CONFIGS[name])
    ids = _ids(2, 17)
    packed = _logits(model, build_cache(model, config, "packed", quantize_in_forward=in_forward), ids, 10)
    simulated = _logits(model, build_cache(model, config, "simulated", quantize_in_forward=in_forward), ids, 10)
    ref = _logits(model, DynamicCache(config=model.config), ids, 10)
    assert torch.equal(packed, simulated)
    assert not torch.allclose(packed, ref, atol=1e-3)  # the quantization is really there


def test_serving_prefill_sees_full_precision_and_in_forward_does_not(model):
    ids = _ids(1, 12)
    config = KVPrecisionConfig.uniform(2, 2, L)
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits
        served = model(ids, past_key_values=build_cache(model, config)).logits
        in_forward = model(ids, past_key_values=build_cache(model, config, quantize_in_forward=True)).logits
    assert torch.equal(served, ref)
    assert float((in_forward - ref).abs().max()) > 1e-3


@pytest.mark.parametrize(("length", "k_quantized", "k_full", "v_quantized"),
                         [(16, 16, 0, 8), (17, 16, 1, 9), (8, 8, 0, 0), (7, 0, 7, 0)])
def test_kivi_keys_quantize_in_whole_windows(model, length, k_quantized, k_full, v_quantized):
    config = KVPrecisionConfig.uniform(2, 2, L, mode="kivi", group_size=4, residual=8)
    cache = build_cache(model, config)
    with torch.no_grad():
        model(_ids(1, length), past_key_values=cache)
    held = cache.layers[0].held()
    assert held == {"k_quantized": k_quantized, "k_full": k_full, "v_quantized": v_quantized,
                    "v_full": length - v_quantized}
    assert cache.get_seq_length() == length


def test_streaming_holds_what_prefill_holds(model):
    config = KVPrecisionConfig(layers=MIXED, mode="kivi", group_size=4, residual=8)
    streamed, prefilled = build_cache(model, config), build_cache(model, config)
    ids = _ids(1, 21)
    with torch.no_grad():
        model(ids[:, :3], past_key_values=streamed)
        for t in range(3, 21):
            model(ids[:, t:t + 1], past_key_values=streamed)
        model(ids, past_key_values=prefilled)
    assert [lay.held() for lay in streamed.layers] == [lay.held() for lay in prefilled.layers]
    assert streamed.nbytes() == prefilled.nbytes()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("length", [1, 8, 29])
def test_packed_bytes_match_kv_bits(model, name, length):
    config = KVPrecisionConfig(layers=MIXED, **CONFIGS[name])
    cache = build_cache(model, config)
    with torch.no_grad():
        model(_ids(2, length), past_key_values=cache)
    bits = kv_bits(config, seq_len=length, head_dim=HEAD_DIM, fp_bits=32)  # the model runs in fp32
    elements = 2 * L * 2 * KV_HEADS * length * HEAD_DIM  # (K, V) x layers x batch x heads x T x D
    assert cache.nbytes() * 8 == pytest.approx(bits["effective"] * elements, rel=1e-12)
    assert bits["nominal"] == pytest.approx((4 + 2 + 8 + 4 + 2 + 16) / 6)


def test_kv_bits_of_kv4_at_2k_tokens():
    config = KVPrecisionConfig.uniform(4, 4, 4)
    assert kv_bits(config, seq_len=2048, head_dim=128) == {"nominal": 4.0, "effective": 4.25}
    # G = R = 32: +1 bit of metadata; 2048 is whole windows, so every key is quantized and 32 values stay fp16
    kivi = KVPrecisionConfig.uniform(4, 4, 4, mode="kivi")
    expected = (5 + (2048 - 32) / 2048 * 5 + 32 / 2048 * 16) / 2
    assert kv_bits(kivi, seq_len=2048, head_dim=128)["effective"] == pytest.approx(expected)


@pytest.mark.parametrize(("batch", "length", "new"), [(1, 7, 5), (3, 16, 9), (2, 24, 4)])
@pytest.mark.parametrize("name", ["per_token", "kivi"])
def test_generate_with_the_cache(model, batch, length, new, name):
    ids = _ids(batch, length)
    config = KVPrecisionConfig(layers=MIXED, **CONFIGS[name])
    cache = build_cache(model, config)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (batch, length + new) and torch.equal(out[:, :length], ids)
    assert cache.get_seq_length() == length + new - 1  # the last token is never fed back
    simulated = build_cache(model, config, "simulated")
    again = model.generate(ids, past_key_values=simulated, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(out, again)


def test_generate_16_bit_matches_plain_generate(model):
    ids = _ids(2, 9)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kw)
    ours = model.generate(ids, past_key_values=build_cache(model, KVPrecisionConfig.uniform(16, 16, L)), **kw)
    assert torch.equal(plain, ours)


def test_beam_search_16_bit_matches_plain_beam_search(model):
    ids = _ids(2, 10)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0)
    plain = model.generate(ids, **kw)
    ours = model.generate(ids, past_key_values=build_cache(model, KVPrecisionConfig.uniform(16, 16, L)), **kw)
    assert torch.equal(plain, ours)


def test_beam_search_reorders_packed_like_simulated(model):
    ids = _ids(2, 10)
    config = KVPrecisionConfig(layers=MIXED, **CONFIGS["kivi"])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, num_beams=3, pad_token_id=0)
    packed = model.generate(ids, past_key_values=build_cache(model, config), **kw)
    simulated = model.generate(ids, past_key_values=build_cache(model, config, "simulated"), **kw)
    assert torch.equal(packed, simulated)


def test_reset_cache_is_reusable(model):
    config = KVPrecisionConfig(layers=MIXED, **CONFIGS["kivi"])
    cache = build_cache(model, config)
    ids = _ids(1, 13)
    first = _logits(model, cache, ids)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    assert torch.equal(_logits(model, cache, ids), first)


def test_config_round_trips_through_dict():
    config = KVPrecisionConfig(layers=MIXED, mode="kivi", group_size=8, residual=16)
    assert KVPrecisionConfig.from_dict(config.to_dict()) == config
    as_objects = {"layers": [{"k": 4, "v": 2}, {"k": 8, "v": 4}, {"k": 2, "v": 16}], "mode": "kivi"}
    assert KVPrecisionConfig.from_dict(as_objects).layers == MIXED
    assert KVPrecisionConfig.from_dict(as_objects).residual == 32


@pytest.mark.parametrize(("config", "field", "words"), [
    (dict(layers=[[4, 4]] * 2), "kv.layers", "2 layer pairs given, the model has 3 layers"),
    (dict(layers=[[4, 4]] * 4), "kv.layers", "4 layer pairs given, the model has 3 layers"),
    (dict(layers=[[4, 4], [3, 4], [4, 4]]), "kv.layers[1]", "k_bits=3 is not one of (2, 4, 8, 16)"),
    (dict(layers=[[4, 4], [4, 4], [4, 1]]), "kv.layers[2]", "v_bits=1 is not one of"),
    (dict(layers=[[4, 4], [4], [4, 4]]), "kv.layers[1]", "is not a (k_bits, v_bits) pair"),
    (dict(layers=[[4, 4]] * 3, mode="kivi", group_size=8, residual=12), "kv.residual", "multiple of group_size"),
    (dict(layers=[[4, 4]] * 3, group_size=5), "kv.group_size", "5 does not divide head_dim 16"),
    (dict(layers=[[4, 4]] * 3, mode="fp8"), "kv.mode", "'fp8' is not one of"),
    (dict(layers=[[4, 4]] * 3, window=3), "kv", "unknown fields ['window']"),
])
def test_bad_configs_are_refused_with_a_clear_message(model, config, field, words):
    with pytest.raises(InvalidKVConfig) as info:
        build_cache(model, config)
    assert info.value.field == field and words in str(info.value)


def test_layers_are_transformers_cache_layers(model):
    cache = build_cache(model, KVPrecisionConfig.uniform(4, 4, L))
    assert len(cache.layers) == L and all(isinstance(lay, KVQuantLayer) for lay in cache.layers)
    assert cache.get_max_length() == -1 and not cache.is_croppable
