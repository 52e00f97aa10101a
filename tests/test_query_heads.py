"""Query-head attention units (`attention_unit: q_head`, K/V heads kept): exact parameter counts, sliced ==
masked logits with any heads of any group kept, cached generation, save/load, the criteria scoring query heads,
the level database and the evaluator's export."""

from __future__ import annotations

import pytest
import torch
from conftest import layout_of, tiny_model, unit_space
from pydantic import ValidationError
from test_slicing import _scores

from darwinfront.core.errors import InvalidSpec
from darwinfront.core.methods import parse_spec
from search.genome import PruneGenome
from workers import criteria, database, levels, slicing
from workers.criteria.base import UnitScores
from workers.criteria.gate import gate_gradients

MLP_STEP = 8


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tokens(vocab: int, shape=(2, 12), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _head_scores(model, seed: int = 1) -> UnitScores:
    return _scores(model, seed, attention_unit="q_head")


def _layout(model, heads: list[tuple[int, ...]]) -> slicing.Layout:
    d = slicing.dims(model)
    return slicing.Layout(
        tuple(slicing.LayerLayout(h, tuple(range(0, d.mlp_units, 2))) for h in heads), attention_unit="q_head",
        mlp_unit=d.mlp_unit,
    )


def test_query_head_costs_leave_the_kv_heads_to_the_whole_attention():
    # hidden 32, 4 query heads of 8 on 2 KV heads: a unit = q rows 8x32 + o columns 32x8; K/V = 2 x 16x32
    space = unit_space(tiny_model("llama_gqa"), MLP_STEP, "q_head")
    assert (space.attn_levels, space.attn_unit_params, space.attn_shared_params) == (4, 512, 1024)
    qwen = unit_space(tiny_model("qwen2_bias"), MLP_STEP, "q_head")
    assert (qwen.attn_unit_params, qwen.attn_shared_params) == (512 + 8, 1024 + 32)  # q bias; k, v biases
    kv = unit_space(tiny_model("llama_gqa"), MLP_STEP)
    assert space.prunable_params == kv.prunable_params  # the same weights, cut into finer steps
    half = PruneGenome(attn=(2, 2, 2), mlp=(0, 0, 0))
    whole = PruneGenome(attn=(4, 0, 2), mlp=(0, 0, 0))  # same level sum, layer 0's attention gone with its K/V
    assert space.params(half) - space.params(whole) == 1024


def test_sliced_query_heads_count_exactly_and_match_the_masked_model(surgery_kind):
    dense = tiny_model(surgery_kind)
    space = unit_space(dense, MLP_STEP, "q_head")
    scores, tokens = _head_scores(dense), _tokens(96)
    genomes = [space.uniform(0.5), PruneGenome(attn=(space.attn_levels, 1, 3), mlp=(2, space.mlp_levels, 1))]
    for genome in genomes:
        model = tiny_model(surgery_kind)
        layout = layout_of(genome, scores, MLP_STEP, attention_unit="q_head", model=model)
        with slicing.masked(model, layout):
            masked_logits = model(input_ids=tokens).logits
        slicing.slice_model(model, layout)
        assert slicing.count_parameters(model) == space.params(genome), genome
        torch.testing.assert_close(model(input_ids=tokens).logits, masked_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", [(1, 2), (0, 1, 3), (3,), (0, 1)])
def test_any_heads_of_any_group_pair_with_their_kv_head(heads):
    model, tokens = tiny_model("llama_gqa"), _tokens(96)
    layout = _layout(model, [heads, (0, 1, 2, 3), ()])
    with slicing.masked(model, layout):
        expected = model(input_ids=tokens).logits
    slicing.slice_model(model, layout)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, slicing.QueryHeadAttention)
    assert attn.q_proj.weight.shape == (8 * len(heads), 32) and attn.k_proj.weight.shape == (16, 32)
    assert list(attn.kv_head_of_query) == [h // 2 for h in heads]
    assert isinstance(model.model.layers[2].self_attn, slicing.NoAttention)
    torch.testing.assert_close(model(input_ids=tokens).logits, expected, atol=1e-5, rtol=0)


def test_cutting_query_heads_changes_the_function():
    model, tokens = tiny_model("llama_gqa"), _tokens(96)
    dense = model(input_ids=tokens).logits
    slicing.slice_model(model, _layout(model, [(0, 3), (1,), (2,)]))
    assert (model(input_ids=tokens).logits - dense).abs().max() > 0.1


def test_generate_with_cache_after_cutting_query_heads(surgery_kind):
    model = tiny_model(surgery_kind)
    layout = _layout(model, [(), (1, 2), (0, 3)])  # no attention first: the cache still counts its tokens
    prompt = _tokens(model.config.vocab_size, shape=(1, 5))
    with slicing.masked(model, layout):
        expected = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    slicing.slice_model(model, layout)
    cached = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert cached.tolist() == expected.tolist()


def test_query_head_model_saves_loads_and_applies_its_configuration(surgery_kind, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_model(surgery_kind)
    space = unit_space(model, MLP_STEP, "q_head")
    genome = PruneGenome(attn=(1, space.attn_levels, 3), mlp=(1, 0, 2))
    layout = layout_of(genome, _head_scores(model), MLP_STEP, attention_unit="q_head", model=model)
    document = {**layout.to_dict(), "parameters": space.params(genome)}
    assert document["attention_unit"] == "q_head"
    slicing.apply_configuration(model, document)
    tokens = _tokens(model.config.vocab_size)
    expected = model(input_ids=tokens).logits
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    slicing.save_pruned(model, tokenizer, tmp_path / "pruned")
    loaded, _ = slicing.load_pruned(tmp_path / "pruned")
    assert slicing.Layout.from_dict(loaded.config.darwinfront_layout) == layout
    assert slicing.count_parameters(loaded) == document["parameters"]
    torch.testing.assert_close(loaded(input_ids=tokens).logits, expected, atol=0, rtol=0)


def test_configurations_without_an_attention_unit_read_as_kv_groups_and_indices_are_checked():
    model = tiny_model("llama_gqa")
    layout = _layout(model, [(0, 3), (1,), (2,)])
    legacy = {"layers": layout.to_dict()["layers"]}
    assert slicing.Layout.from_dict(legacy).attention_unit == "kv_group"
    with pytest.raises(InvalidSpec, match=r"configuration.layers\[0\].attn_units"):  # head 3 is no KV group
        slicing.apply_configuration(model, {**legacy, "parameters": 0})
    with pytest.raises(InvalidSpec, match="layout.attention_unit"):
        slicing.Layout.from_dict({**legacy, "attention_unit": "heads"})


# --- criteria on query heads ---------------------------------------------------------------------------------


def _criteria_model():
    from test_criteria_support import tiny_model as fp64_model

    return fp64_model()  # fp64, H = 4 query heads on G = 2 KV heads, h = 16


def _calibration(n: int = 8, t: int = 32):
    from test_criteria_support import calibration

    return calibration(n=n, t=t)


@pytest.mark.parametrize("name", criteria.names())
def test_every_criterion_scores_each_query_head(name):
    model = _criteria_model()
    scores = criteria.get(name, attention_unit="q_head").score(model, _calibration(n=4, t=16))
    assert [tuple(s.attn.shape) for s in scores.layers] == [(4,), (4,)]
    assert [tuple(s.mlp.shape) for s in scores.layers] == [(128,), (128,)]


@pytest.mark.parametrize("name", ["magnitude", "wanda_sp", "flap", "gate"])
def test_query_head_scores_add_up_to_their_kv_group(name):
    # column sums for the first three; for gates, d/dm of a group's gate is the sum over its heads' gates
    model, calib = _criteria_model(), _calibration()
    heads = criteria.get(name, attention_unit="q_head").score(model, calib)
    groups = criteria.get(name).score(model, calib)
    if name == "gate":  # compare signed gradients: |.| of a sum is not the sum of |.|
        heads, groups = (gate_gradients(model, calib, attention_unit=u)[0] for u in ("q_head", "kv_group"))
        heads = [h["attn"] for h in heads]
        groups = [g["attn"] for g in groups]
    else:
        heads, groups = [s.attn for s in heads.layers], [s.attn for s in groups.layers]
    for h, g in zip(heads, groups, strict=True):
        torch.testing.assert_close(h.reshape(2, 2).sum(1), g, rtol=1e-9, atol=1e-12)
        assert h.abs().min() > 0


@pytest.mark.parametrize("name", ["magnitude", "wanda_sp", "flap", "taylor", "gate", "gate_fisher", "ablation"])
def test_a_dead_query_head_scores_exactly_zero(name):
    model = _criteria_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * 16 : 3 * 16] = 0  # query head 2 writes nothing
    s = criteria.get(name, attention_unit="q_head").score(model, _calibration(n=4, t=16)).layers[1].attn
    assert abs(s[2].item()) < 1e-12 and (s[[0, 1, 3]] > 0).all()


def test_taylor_on_query_heads_leaves_the_kept_kv_weights_out():
    from workers.criteria.taylor import weight_gradients

    model, calib = _criteria_model(), _calibration(n=4, t=16)
    heads = criteria.get("taylor", attention_unit="q_head").score(model, calib).layers[0].attn
    grads = weight_gradients(model, calib, kinds=("attn",))[0]["attn"]
    attn = model.model.layers[0].self_attn
    q = (attn.q_proj.weight * grads["q"]).abs().sum(1).reshape(4, 16).sum(1)
    o = (attn.o_proj.weight * grads["o"]).abs().sum(0).reshape(4, 16).sum(1)
    torch.testing.assert_close(heads, (q + o).detach(), rtol=1e-9, atol=0)


# --- the level database and the search path ------------------------------------------------------------------


def _db_calibration(model, n: int = 8, t: int = 16) -> torch.Tensor:
    return torch.randint(model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))


def test_query_head_table_steps_through_heads():
    model = tiny_model("llama_gqa")
    table = levels.table_for(model, levels=10, multiple=8, attention_unit="q_head")
    assert (table.attn_units, table.attn_step, table.attn_levels) == (4, 1, 4)
    assert levels.LevelTable.from_dict(table.to_dict()) == table
    old = {k: v for k, v in table.to_dict().items() if k != "attention_unit"}
    assert levels.LevelTable.from_dict(old).attention_unit == "kv_group"  # indexes written before query heads


@pytest.mark.parametrize("criterion", ["obs", "wanda_sp"])
def test_query_head_candidates_give_the_masked_logits_and_count(criterion, tmp_path):
    from test_candidate import masked_reference

    from workers import candidate

    model = tiny_model("llama_gqa")
    calibration = _db_calibration(model)
    table = levels.table_for(model, levels=6, multiple=8, attention_unit="q_head")
    db = database.build(model, calibration, criterion=criterion, table=table, root=tmp_path)
    kv_db = database.build(model, calibration, criterion=criterion, root=tmp_path,
                           table=levels.table_for(model, levels=6, multiple=8))
    assert db.key != kv_db.key and all(len(order["attn"]) == 4 for order in db.orders)
    space = levels.level_space(model, db.table)
    genome = PruneGenome(attn=(1, 4, 3), mlp=(2, 5, 6))
    layout = levels.layout(genome, db.orders, db.table)
    assert layout.attention_unit == "q_head" and len(layout.layers[0].attn_units) == 3
    weights = candidate.LevelWeights(db, model.model.layers[0].self_attn.o_proj.weight) if db.stores_weights else None
    built = candidate.build(model, db, genome, weights=weights)
    assert isinstance(built.model.layers[0].self_attn, slicing.QueryHeadAttention)
    with torch.inference_mode():
        masked, _ = masked_reference(model, db, genome)
        torch.testing.assert_close(built(calibration).logits, masked(calibration).logits, atol=1e-5, rtol=0)
    assert slicing.count_parameters(built) == space.params(genome)


def test_spec_takes_query_heads_and_names_a_bad_unit():
    spec = parse_spec({"model": {"source": "builtin:micro-llama"}, "prune": {"attention_unit": "q_head"}})
    assert spec.prune.attention_unit == "q_head"
    with pytest.raises(ValidationError) as caught:
        parse_spec({"model": {"source": "builtin:micro-llama"}, "prune": {"attention_unit": "heads"}})
    assert caught.value.errors()[0]["loc"] == ("prune", "attention_unit")


@pytest.mark.integration
def test_a_query_head_job_evaluates_and_exports_a_model_that_reloads_to_its_kl(micro_dir, tmp_path):
    from test_prune_search import MICRO

    from workers import fitness
    from workers.evaluator import Evaluator
    from workers.prepare import prepare

    spec = parse_spec({**MICRO, "prune": {**MICRO["prune"], "attention_unit": "q_head"}})
    spec = spec.model_dump(mode="json")
    prepared = prepare(spec)
    assert prepared["database"]["table"]["attention_unit"] == "q_head"
    assert prepared["space"]["attn_levels"] == 4 and prepared["space"]["attn_shared_params"] > 0
    evaluator = Evaluator(spec, prepared)
    genome = PruneGenome(attn=(1, 3), mlp=(5, 11))
    request = {"candidate_id": "c", "genome": genome.to_dict(), "target": 0.5, "generation": 1, "stage": 1,
               "seed": 11, "sequences": 8, "train_tokens": 256, "final": True}
    reply = evaluator.evaluate(request)
    assert "error" not in reply, reply
    configuration = evaluator.configuration(request, {"candidate_id": "c", "target": 0.5, "kl": reply["kl"]})
    assert configuration["attention_unit"] == "q_head"
    assert [len(layer["attn_units"]) for layer in configuration["layers"]] == [3, 1]
    exported = evaluator.export(configuration, str(tmp_path / "c"))
    assert exported["params"] == reply["params"] == configuration["parameters"]
    reloaded, _ = slicing.load_pruned(tmp_path / "c")
    assert reloaded.model.layers[0].self_attn.kv_head_of_query is not None  # 3 query heads on 2 KV heads
    kl = fitness.kl(reloaded, evaluator.inputs.calibration, evaluator.teacher)
    assert kl == pytest.approx(reply["kl"], rel=1e-4)


def test_a_query_head_candidate_post_trains_with_its_heads_still_cut(micro_dir, tmp_path):
    from test_posttrain import OPTIONS, PARENT_SPEC

    from search.genome import LevelSpace
    from workers import artifacts
    from workers.evaluator import Evaluator
    from workers.posttrain_job import Posttrainer
    from workers.prepare import prepare

    spec = {**PARENT_SPEC, "prune": {**PARENT_SPEC["prune"], "attention_unit": "q_head"}}
    spec = parse_spec(spec).model_dump(mode="json")
    prepared = prepare(spec)
    evaluator = Evaluator(spec, prepared)
    genome = LevelSpace.from_dict(prepared["space"]).uniform(0.5)
    configuration = evaluator.configuration({"genome": genome.to_dict(), "seed": 1, "train_tokens": 0},
                                            {"candidate_id": "c", "target": 0.5, "kl": 0.1})
    evaluator.export(configuration, str(tmp_path / "export"))
    meta = artifacts.archive(tmp_path, "parent", "c", tmp_path / "export")
    trainer = Posttrainer(spec, configuration, str(tmp_path / "artifacts" / meta["path"]), OPTIONS)
    attention = [layer.self_attn for layer in trainer.model.model.layers]
    assert all(a.q_proj.out_features == 2 * a.head_dim and a.k_proj.out_features == 2 * a.head_dim
               for a in attention)  # 2 of 4 query heads left, both K/V heads kept
    before = trainer.measure()
    for _ in range(trainer.describe()["steps"]):
        trainer.step()
    after = trainer.measure()
    assert slicing.count_parameters(trainer.model) == configuration["parameters"]
    assert all(a.q_proj.out_features == 2 * a.head_dim for a in attention)
    assert after["held_out_kl"] < before["held_out_kl"]
