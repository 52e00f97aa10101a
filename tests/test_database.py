"""Level tables and the level database: equal steps, exact parameter counts, nested levels, the on-disk cache,
and candidates built from it that give the masked and the sliced model's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SURGERY_KINDS, tiny_model

from search.genome import PruneGenome
from workers import candidate, database, levels, slicing
from workers.criteria.obs import obs_levels


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _calibration(model, n: int = 8, t: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.vocab_size, (n, t), generator=generator)  # (N, T)


@pytest.mark.parametrize(
    ("units", "levels_", "step"), [(4, 10, 1), (32, 8, 4), (40, 10, 4), (8, 8, 1), (2, 1, 2), (6, 4, 1)]
)
def test_attention_step_divides_or_falls_back_to_one_unit(units, levels_, step):
    assert levels.attention_step(units, levels_) == step


@pytest.mark.parametrize(
    ("width", "levels_", "multiple", "step"),
    [
        (512, 10, 8, 64),  # 64 blocks of 8: divisors 8 and 16 around 10 -> 8 levels of 64
        (768, 8, 8, 96),  # darwinlm.md §8.2: 96 channels per level
        (48, 10, 8, 8),  # 6 blocks: 6 levels
        (14336, 10, 32, 1792),  # 448 blocks: 8 levels (divisor nearest to 10 is 8, vs 14)
        (100, 10, 8, 8),  # 8 does not divide 100: nearest multiple of width/levels, remainder kept
        (128, 16, 8, 8),
    ],
)
def test_mlp_step_is_an_equal_multiple(width, levels_, multiple, step):
    got = levels.mlp_step(width, levels_, multiple)
    assert got == step and got % multiple == 0
    if width % multiple == 0:
        assert width % got == 0  # the top level drops the whole MLP


@pytest.mark.parametrize("kind", SURGERY_KINDS)
def test_every_level_step_costs_exactly_its_parameters(kind):
    model = tiny_model(kind)
    table = levels.table_for(model, levels=4, multiple=4)
    space = levels.level_space(model, table)
    orders = [{"attn": list(range(table.attn_units)), "mlp": list(range(table.mlp_units))[::-1]}] * space.n_layers
    genomes = [
        PruneGenome(attn=(0,) * space.n_layers, mlp=(0,) * space.n_layers),
        PruneGenome(attn=(1, 0, space.attn_levels), mlp=(space.mlp_levels, 1, 2)),
        PruneGenome(attn=(space.attn_levels,) * 3, mlp=(space.mlp_levels,) * 3),
    ]
    for genome in genomes:
        sliced = slicing.slice_model(copy.deepcopy(model), levels.layout(genome, orders, table))
        assert slicing.count_parameters(sliced) == space.params(genome)


def test_removal_order_removes_the_lowest_first_the_higher_index_on_ties():
    assert levels.removal_order([3.0, 1.0, 1.0, 2.0]) == [2, 1, 3, 0]


@pytest.fixture
def obs_db(random_llama, tmp_path):
    table = levels.table_for(random_llama, levels=6, multiple=8)
    return database.build(random_llama, _calibration(random_llama), criterion="obs", table=table, root=tmp_path)


def test_obs_levels_are_nested_and_hold_the_obs_weights(random_llama, obs_db):
    table = obs_db.table
    assert obs_db.stores_weights and obs_db.built
    reference = obs_levels(random_llama, _calibration(random_llama), {k: table.counts(k) for k in levels.KINDS})
    group_width = random_llama.model.layers[0].self_attn.o_proj.in_features // table.attn_units
    for i in range(obs_db.n_layers):
        for kind in levels.KINDS:
            width = group_width if kind == "attn" else 1
            previous: set[int] = set()
            for level in range(1, table.top(kind) + 1):
                weight = obs_db.load_level(i, kind, level)["weight"]
                zero_units = {u for u in range(table.units(kind))
                              if not weight[:, u * width : (u + 1) * width].any()}
                assert zero_units == set(obs_db.removed(i, kind, level))
                assert len(zero_units) == table.removed(kind, level) and previous <= zero_units
                previous = zero_units
                assert torch.equal(weight, reference[i][kind].weights[table.removed(kind, level)])


def test_second_build_is_a_cache_hit_and_the_key_names_the_inputs(random_llama, obs_db, tmp_path):
    calibration = _calibration(random_llama)
    again = database.build(random_llama, calibration, criterion="obs", table=obs_db.table, root=tmp_path)
    assert not again.built and again.key == obs_db.key and again.orders == obs_db.orders
    other_data = database.build(random_llama, _calibration(random_llama, seed=1), criterion="obs",
                                table=obs_db.table, root=tmp_path)
    other_table = database.build(random_llama, calibration, criterion="obs", root=tmp_path,
                                 table=levels.table_for(random_llama, levels=3, multiple=8))
    masks = database.build(random_llama, calibration, criterion="wanda_sp", table=obs_db.table, root=tmp_path)
    keys = {obs_db.key, other_data.key, other_table.key, masks.key}
    assert len(keys) == 4 and all(db.built for db in (other_data, other_table, masks))
    assert not masks.stores_weights and not list(masks.directory.glob("*.safetensors"))


def test_candidates_of_mask_levels_give_the_masked_and_the_sliced_logits(surgery_kind, tmp_path):
    random_llama = tiny_model(surgery_kind)  # every family
    calibration = _calibration(random_llama)
    table = levels.table_for(random_llama, levels=6, multiple=8)
    db = database.build(random_llama, calibration, criterion="wanda_sp", table=table, root=tmp_path)
    genome = PruneGenome(attn=(1, 0, 2), mlp=(2, 5, 6))
    layout = levels.layout(genome, db.orders, table)
    with torch.inference_mode():
        with slicing.masked(random_llama, layout):
            masked = random_llama(calibration).logits
        built = candidate.build(random_llama, db, genome)(calibration).logits
        sliced = slicing.slice_model(copy.deepcopy(random_llama), layout)(calibration).logits
    assert torch.allclose(built, masked, atol=1e-5) and torch.equal(built, sliced)


def test_candidates_of_obs_levels_hold_the_stored_weights_kept_columns(random_llama, obs_db):
    genome = PruneGenome(attn=(2, 1, 0), mlp=(1, 3, 6))
    calibration = _calibration(random_llama)
    like = random_llama.model.layers[0].self_attn.o_proj.weight
    built = candidate.build(random_llama, obs_db, genome, weights=candidate.LevelWeights(obs_db, like))
    stored = obs_db.load_level(1, "attn", 1)["weight"]  # (hidden, heads * head_dim), the removed group's columns zero
    kept = stored[:, stored.abs().sum(0) > 0]
    assert torch.equal(built.model.layers[1].self_attn.o_proj.weight, kept)
    with torch.inference_mode():
        dense_cut = slicing.slice_model(copy.deepcopy(random_llama), levels.layout(genome, obs_db.orders, obs_db.table))
        assert not torch.allclose(built(calibration).logits, dense_cut(calibration).logits, atol=1e-3)  # OBS weights
