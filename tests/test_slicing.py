"""Physical slicing against known answers: exact parameter counts, masked == sliced logits, save/load round trips."""

from __future__ import annotations

import pytest
import torch
from conftest import layout_of, tiny_model, unit_space

from darwinfront.core.errors import InvalidSpec
from search.genome import PruneGenome
from workers import slicing
from workers.criteria.base import LayerScores, UnitScores

torch.set_num_threads(1)
MLP_STEP = 8


def _scores(model, seed: int = 1, attention_unit: str = "kv_group") -> UnitScores:
    """Random scores for every attention unit (KV groups or query heads) and MLP channel."""
    d = slicing.dims(model)
    g = torch.Generator().manual_seed(seed)
    units = d.attn_units(attention_unit)
    layers = tuple(
        LayerScores(attn=torch.rand(units, generator=g), mlp=torch.rand(d.mlp_units, generator=g))
        for _ in range(d.n_layers)
    )
    return UnitScores(layers=layers, criterion="hand")


def _genomes(space) -> list[PruneGenome]:
    """No cut, the uniform half, and a lopsided genome that empties layer 0's attention and layer 1's MLP."""
    return [
        PruneGenome(attn=(0,) * space.n_layers, mlp=(0,) * space.n_layers),
        space.uniform(0.5),
        PruneGenome(attn=(space.attn_levels, 1, 0), mlp=(2, space.mlp_levels, 1)),
    ]


def _tokens(vocab: int, shape=(2, 12), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_level_space_known_costs():
    # hidden 32, 4 query heads of 8 on 2 KV heads: a unit = q rows 16x32 + o cols 32x16 + k, v rows 8x32 each
    space = unit_space(tiny_model("llama_gqa"), MLP_STEP)
    assert (space.n_layers, space.attn_levels, space.mlp_levels) == (3, 2, 6)
    assert space.attn_unit_params == 2 * 16 * 32 + 2 * 8 * 32 == 1536
    assert space.mlp_level_params == 8 * 3 * 32 == 768
    # MHA: a unit is one head: q, k, v rows 8x32 and o columns 32x8
    assert unit_space(tiny_model("llama_mha"), MLP_STEP).attn_unit_params == 4 * 8 * 32
    # Qwen2 adds the q, k, v biases of the group (16 + 8 + 8); its MLP has no bias
    qwen = unit_space(tiny_model("qwen2_bias"), MLP_STEP)
    assert (qwen.attn_unit_params, qwen.mlp_level_params) == (1536 + 32, 768)
    # mlp_bias adds the gate and up bias entries of each channel
    assert unit_space(tiny_model("llama_bias"), MLP_STEP).mlp_level_params == 8 * (3 * 32 + 2)


def test_dense_params_count_tied_embeddings_once():
    model = tiny_model("llama_gqa")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    per_layer = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 48 + 2 * 32  # q, o, k, v, mlp, two norms
    assert unit_space(model, MLP_STEP).dense_params == 96 * 32 + 3 * per_layer + 32


def test_layouts_keep_highest_scores_ties_to_lower_index():
    scores = UnitScores(
        layers=(
            LayerScores(attn=torch.tensor([0.3, 0.1, 0.3, 0.9]), mlp=torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 2.0])),
            LayerScores(attn=torch.tensor([1.0, 1.0, 1.0, 1.0]), mlp=torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])),
        ),
        criterion="hand",
    )
    layout = layout_of(PruneGenome(attn=(2, 4), mlp=(2, 1)), scores, mlp_step=2)
    assert layout.layers[0].attn_units == (0, 3)
    assert layout.layers[0].mlp_channels == (0, 2)  # drops 4 (0.0), 1 (1.0), 5 (2.0) and 3 (tie with 2)
    assert layout.layers[1].attn_units == ()
    assert layout.layers[1].mlp_channels == (2, 3, 4, 5)


def test_layouts_refuse_a_genome_past_the_units():
    scores = UnitScores(layers=(LayerScores(attn=torch.ones(2), mlp=torch.ones(4)),), criterion="hand")
    with pytest.raises(InvalidSpec, match=r"genome.mlp: level 3 outside 0..2"):
        layout_of(PruneGenome(attn=(0,), mlp=(3,)), scores, mlp_step=2)


def test_layout_round_trips_through_json_dict():
    layout = slicing.Layout((slicing.LayerLayout((1, 0), (5, 2)), slicing.LayerLayout((), (0,))))
    assert layout.layers[0].attn_units == (0, 1)
    assert slicing.Layout.from_dict(layout.to_dict()) == layout
    with pytest.raises(InvalidSpec, match="layout"):
        slicing.Layout.from_dict({"layers": [{"attn_units": [0]}]})


def test_sliced_params_equal_level_space_and_masked_logits(surgery_kind):
    dense = tiny_model(surgery_kind)
    space, scores, tokens = unit_space(dense, MLP_STEP), _scores(dense), _tokens(96)
    for genome in _genomes(space):
        model = tiny_model(surgery_kind)
        layout = layout_of(genome, scores, MLP_STEP, model=model)
        with slicing.masked(model, layout):
            masked_logits = model(input_ids=tokens).logits
        slicing.slice_model(model, layout)
        assert slicing.count_parameters(model) == space.params(genome), genome
        torch.testing.assert_close(model(input_ids=tokens).logits, masked_logits, atol=1e-5, rtol=0)


def test_slicing_changes_the_function():
    dense = tiny_model("llama_gqa")
    tokens = _tokens(96)
    dense_logits = dense(input_ids=tokens).logits
    layout = layout_of(unit_space(dense, MLP_STEP).uniform(0.5), _scores(dense), MLP_STEP)
    sliced = slicing.slice_model(tiny_model("llama_gqa"), layout)
    assert (sliced(input_ids=tokens).logits - dense_logits).abs().max() > 0.1
    assert sliced.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)  # one of two groups left
    assert sliced.model.layers[0].mlp.down_proj.weight.shape == (32, 24)


def test_masked_hooks_are_removed_on_exit(random_llama):
    tokens = _tokens(96)
    before = random_llama(input_ids=tokens).logits
    layout = layout_of(unit_space(random_llama, MLP_STEP).uniform(0.5), _scores(random_llama), 8)
    with slicing.masked(random_llama, layout):
        assert not torch.allclose(random_llama(input_ids=tokens).logits, before)
    torch.testing.assert_close(random_llama(input_ids=tokens).logits, before, atol=0, rtol=0)


def test_generate_with_cache_when_first_layer_has_no_attention(surgery_kind):
    surgery_model = tiny_model(surgery_kind)
    space = unit_space(surgery_model, MLP_STEP)
    genome = PruneGenome(attn=(space.attn_levels, 1, 0), mlp=(1, space.mlp_levels, 0))
    layout = layout_of(genome, _scores(surgery_model), MLP_STEP, model=surgery_model)
    prompt = _tokens(surgery_model.config.vocab_size, shape=(1, 5))
    with slicing.masked(surgery_model, layout):
        expected = surgery_model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    slicing.slice_model(surgery_model, layout)
    assert isinstance(surgery_model.model.layers[0].self_attn, slicing.NoAttention)
    assert isinstance(surgery_model.model.layers[1].mlp, slicing.NoMLP)
    cached = surgery_model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert cached.shape == (1, 13)
    assert cached.tolist() == expected.tolist()


def test_empty_blocks_return_their_output_bias():
    model = tiny_model("llama_bias")
    o_bias = model.model.layers[0].self_attn.o_proj.bias.detach().clone()
    down_bias = model.model.layers[0].mlp.down_proj.bias.detach().clone()
    layout = slicing.dense_layout(model)
    layout = slicing.Layout((slicing.LayerLayout((), ()), *layout.layers[1:]))
    slicing.slice_model(model, layout)
    x = torch.randn(2, 3, 32)
    out, _ = model.model.layers[0].self_attn(x, position_embeddings=None)
    torch.testing.assert_close(out, o_bias.expand(2, 3, 32))
    torch.testing.assert_close(model.model.layers[0].mlp(x), down_bias.expand(2, 3, 32))


def test_save_and_load_pruned_round_trip(surgery_kind, tmp_path):
    from workers.modeling import load_model

    surgery_model = tiny_model(surgery_kind)
    space = unit_space(surgery_model, MLP_STEP)
    layout = layout_of(_genomes(space)[2], _scores(surgery_model), MLP_STEP, model=surgery_model)
    slicing.slice_model(surgery_model, layout)
    tokens = _tokens(surgery_model.config.vocab_size)
    expected = surgery_model(input_ids=tokens).logits
    tokenizer = _tokenizer()
    slicing.save_pruned(surgery_model, tokenizer, tmp_path / "pruned")
    loaded, loaded_tokenizer = slicing.load_pruned(tmp_path / "pruned", dtype=torch.float32, device="cpu")
    assert slicing.Layout.from_dict(loaded.config.darwinfront_layout) == layout
    assert slicing.count_parameters(loaded) == slicing.count_parameters(surgery_model)
    torch.testing.assert_close(loaded(input_ids=tokens).logits, expected, atol=0, rtol=0)
    assert loaded_tokenizer.eos_token == tokenizer.eos_token
    if surgery_model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    via_loader, _ = load_model(str(tmp_path / "pruned"), device="cpu")
    torch.testing.assert_close(via_loader(input_ids=tokens).logits, expected, atol=0, rtol=0)


def test_slice_or_mask_twice_is_refused(random_llama):
    layout = slicing.dense_layout(random_llama)
    slicing.slice_model(random_llama, layout)
    with pytest.raises(InvalidSpec, match="already sliced"):
        slicing.slice_model(random_llama, layout)
    with pytest.raises(InvalidSpec, match="already sliced"), slicing.masked(random_llama, layout):
        pass


def test_apply_configuration_checks_the_document(random_llama):
    space = unit_space(random_llama, MLP_STEP)
    genome = space.uniform(0.5)
    layout = layout_of(genome, _scores(random_llama), MLP_STEP)
    document = {**layout.to_dict(), "parameters": space.params(genome)}
    with pytest.raises(InvalidSpec, match="2 layers given, the model has 3"):
        slicing.apply_configuration(tiny_model(), {**document, "layers": document["layers"][:2]})
    bad_index = [dict(layer) for layer in document["layers"]]
    bad_index[1] = {**bad_index[1], "attn_units": [0, 2]}
    with pytest.raises(InvalidSpec, match=r"configuration.layers\[1\].attn_units"):
        slicing.apply_configuration(tiny_model(), {**document, "layers": bad_index})
    with pytest.raises(InvalidSpec, match="configuration.parameters"):
        slicing.apply_configuration(tiny_model(), {**document, "parameters": document["parameters"] + 1})
    with pytest.raises(InvalidSpec, match="'layers' and 'parameters'"):
        slicing.apply_configuration(tiny_model(), layout.to_dict())
    model = slicing.apply_configuration(random_llama, document)
    assert slicing.count_parameters(model) == space.params(genome)


def _tokenizer():
    from workers.reference import train_tokenizer

    return train_tokenizer(["def f(x):\n    return x + 1\n", "print('hello world')\n"], vocab_size=280)
