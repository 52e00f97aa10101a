"""HAP's neural implants as a level kind: the least-squares fit, the exact parameter cost, candidates that use them,
the search's choice between pruned levels and implants, and export / reload."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError

from darwinfront.core.methods import parse_spec
from search.genome import PruneGenome
from search.mutation import level_switch, offspring, single_switches
from workers import candidate, configuration, database, implants, levels, slicing
from workers.pruned_hf import export


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _calibration(model, n: int = 8, t: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, t), generator=generator)


def test_the_fit_recovers_a_planted_rank_r_map_exactly():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=generator, dtype=torch.float64)  # (tokens, in)
    planted = torch.randn(24, 5, generator=generator, dtype=torch.float64) @ torch.randn(
        5, 24, generator=generator, dtype=torch.float64)  # (in, out), rank 5
    y = x @ planted
    w_in, w_out = implants.fit_low_rank(x.T @ x, x.T @ y, rank=5)
    assert w_in.shape == (5, 24) and w_out.shape == (24, 5)
    got = x @ w_in.T @ w_out.T
    assert (got - y).abs().max() / y.abs().max() < 1e-5
    lower = implants.fit_low_rank(x.T @ x, x.T @ y, rank=4)  # one rank short: no longer exact, still the best
    assert (x @ lower[0].T @ lower[1].T - y).norm() > 1e-3 * y.norm()


class _One(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)


def _rank_r_mlp(model, layer: int, rank: int) -> None:
    """Make `layer`'s MLP a rank-`rank` linear map of its input: activation 1, only `rank` up_proj rows non-zero."""
    mlp = model.model.layers[layer].mlp
    mlp.act_fn = _One()
    with torch.no_grad():
        mlp.up_proj.weight[rank:] = 0


def test_an_implant_of_a_rank_r_sublayer_gives_its_output():
    model = tiny_model("llama_gqa")
    _rank_r_mlp(model, layer=1, rank=9)
    calibration = _calibration(model, n=16)
    (layer, fitted), = implants.implant_levels(model, calibration, {"mlp": {7: 9}}, layers=[1])
    keep = [slicing.LayerLayout(tuple(range(2)), tuple(range(48))) for _ in range(3)]
    keep[1] = slicing.LayerLayout(tuple(range(2)), (), (("mlp", 9),))
    sliced = slicing.slice_model(copy.deepcopy(model), slicing.Layout(tuple(keep)))
    implants.load_into(sliced.model.layers[1].mlp, fitted["mlp"][7])
    tokens = _calibration(model, n=4, seed=5)  # not the calibration tokens
    with torch.no_grad():
        want, got = model(tokens).logits, sliced(tokens).logits
    assert layer == 1 and (got - want).abs().max() < 1e-5
    # the implant holds 2·hidden·r parameters where the MLP held 3·hidden·48
    assert slicing.count_parameters(model) - slicing.count_parameters(sliced) == 3 * 32 * 48 - 2 * 32 * 9


def test_implant_levels_cost_exactly_what_their_pruned_level_keeps():
    model = tiny_model("llama_gqa")  # hidden 32, 2 KV groups of 2 heads (head_dim 8), MLP 48
    table = levels.table_for(model, levels=8, multiple=2, implants=("attn", "mlp"))
    assert table.mlp_step == 6
    # MLP level k keeps (8 - k)·6 channels of 96 parameters: rank (8 - k)·9 while below 32
    assert {lv: table.implant_rank("mlp", lv) for lv in table.implant_levels("mlp")} == {5: 27, 6: 18, 7: 9}
    assert table.implant_levels("attn") == (1,) and table.implant_rank("attn", 1) == 24  # one group: 1536 = 64·24
    assert levels.table_for(model, levels=8, multiple=2).to_dict() == {
        k: v for k, v in table.to_dict().items() if k != "implant_ranks"}  # no implants: the table of before
    space = levels.level_space(model, table)
    assert space.mlp_implant_levels == (5, 6, 7) and space.attn_implant_levels == (1,)


@pytest.fixture
def implant_db(random_llama, tmp_path):
    table = levels.table_for(random_llama, levels=8, multiple=2, implants=("attn", "mlp"))
    return database.build(random_llama, _calibration(random_llama), criterion="wanda_sp", table=table,
                          root=tmp_path)


GENOME = PruneGenome(attn=(1, 0, 1), mlp=(7, 5, 2), implants=((0, "attn"), (0, "mlp"), (1, "mlp")))


def test_candidates_with_implants_have_the_spaces_parameter_count_and_the_fitted_maps(random_llama, implant_db):
    space = levels.level_space(random_llama, implant_db.table)
    weights = candidate.LevelWeights(implant_db, random_llama.model.layers[0].self_attn.o_proj.weight)
    built = candidate.build(random_llama, implant_db, GENOME, weights=weights)
    plain = candidate.build(random_llama, implant_db, PruneGenome(GENOME.attn, GENOME.mlp))
    assert slicing.count_parameters(built) == space.params(GENOME) == slicing.count_parameters(plain)
    layer0 = built.model.layers[0]
    assert type(layer0.mlp).__name__ == "ImplantMLP" and layer0.mlp.rank == 9
    assert type(layer0.self_attn).__name__ == "ImplantAttention" and layer0.self_attn.rank == 24
    stored = implant_db.load_implant(1, "mlp", 5)
    assert torch.equal(built.model.layers[1].mlp.implant_in.weight, stored["in"])
    assert type(built.model.layers[2].mlp).__name__ == "LlamaMLP"  # level 2: pruned, no implant there
    # on its calibration inputs an implant is the best rank-r linear map of the dense sub-layer: closer to its
    # outputs than removing the sub-layer (the zero map)
    seen = []
    handle = random_llama.model.layers[1].mlp.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    with torch.no_grad():
        random_llama(_calibration(random_llama))
        handle.remove()
        x, y = seen[0]
        assert (built.model.layers[1].mlp(x) - y).norm() < 0.9 * y.norm()
    structure = candidate.build(random_llama, implant_db, GENOME)  # no weights: zero implants, same size
    assert slicing.count_parameters(structure) == space.params(GENOME)
    assert structure.model.layers[0].mlp.implant_in.weight.abs().sum() == 0


def test_a_model_with_implants_exports_and_reloads_with_the_same_logits(random_llama, implant_db, tmp_path):
    from test_pruned_export import run_outside

    weights = candidate.LevelWeights(implant_db, random_llama.model.layers[0].self_attn.o_proj.weight)
    model = candidate.build(random_llama, implant_db, GENOME, weights=weights)
    folder = tmp_path / "implanted"
    slicing.save_pruned(model, None, folder)
    shapes = export.layer_shapes(model)
    assert shapes[0]["attention_implant_rank"] == 24 and shapes[0]["mlp_implant_rank"] == 9
    assert "attention_implant_rank" not in shapes[2] and "mlp_implant_rank" not in shapes[2]
    tokens = _calibration(random_llama, n=2, t=9, seed=1)
    loaded = export.load(folder)  # what load_pruned gives (no tokenizer here)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
        torch.testing.assert_close(loaded(input_ids=tokens).logits, logits, atol=1e-6, rtol=0)
    assert slicing.count_parameters(loaded) == slicing.count_parameters(model)
    assert slicing.Layout.from_dict(loaded.config.darwinfront_layout) == levels.layout(
        GENOME, implant_db.orders, implant_db.table)
    torch.save({"tokens": tokens, "logits": logits}, folder / "expected.pt")
    got = run_outside([folder], tmp_path)[str(folder)]  # AutoModelForCausalLM(trust_remote_code=True)
    assert got["class"] == "PrunedLlamaForCausalLM" and got["max_diff"] <= 1e-5 and got["round_trip_diff"] == 0.0
    assert got["generated"] == 6 and got["cache_agrees"]


def test_apply_configuration_and_rebuild_give_the_implant_structure_and_weights(random_llama, implant_db):
    layout = levels.layout(GENOME, implant_db.orders, implant_db.table)
    space = levels.level_space(random_llama, implant_db.table)
    document = {**layout.to_dict(), "parameters": space.params(GENOME)}
    cut = slicing.apply_configuration(copy.deepcopy(random_llama), document)
    assert slicing.count_parameters(cut) == space.params(GENOME)
    assert layout.to_dict()["layers"][0]["implants"] == {"attn": 24, "mlp": 9}
    assert "implants" not in layout.to_dict()["layers"][2]


def test_the_mutation_flips_implants_at_no_parameter_cost_and_drops_stale_ones(random_llama, implant_db):
    space = levels.level_space(random_llama, implant_db.table)
    parent = PruneGenome(attn=(1, 0, 1), mlp=(7, 5, 2))
    children = offspring(parent, space, random.Random(0), 40, seen=set())
    with_implants = [c for c in children if c.implants]
    assert with_implants and all(space.params(c) == space.params(parent) for c in children)
    for child in children:
        space.check(child)  # every implant sits at a level that has one
    moved = PruneGenome(attn=(1, 0, 1), mlp=(7, 5, 2), implants=((1, "mlp"),))
    assert space.settle(PruneGenome(moved.attn, (7, 4, 3), moved.implants)).implants == ()
    flips = [g for g in single_switches(moved, space) if (g.attn, g.mlp) == (moved.attn, moved.mlp)]
    others = [(0, "attn"), (2, "attn"), (0, "mlp")]
    assert {g.implants for g in flips} == {tuple(sorted({(1, "mlp"), slot})) for slot in others} | {()}
    plain = levels.level_space(random_llama, levels.table_for(random_llama, levels=8, multiple=2))
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert level_switch(parent, plain, rng_a) == level_switch(parent, plain, rng_b) and not plain.has_implants


def test_genome_documents_without_implants_are_unchanged():
    genome = PruneGenome(attn=(1, 0), mlp=(2, 3))
    assert genome.to_dict() == {"attn": [1, 0], "mlp": [2, 3]} and genome.key() == "a1.0-m2.3"
    implanted = PruneGenome(attn=(1, 0), mlp=(2, 3), implants=((1, "mlp"), (0, "attn")))
    assert implanted.key() == "a1.0-m2.3-i0a.1m"
    assert PruneGenome.from_dict(implanted.to_dict()) == implanted


@pytest.mark.parametrize("value, words", [(["ffn"], "'attn' or 'mlp'"), (["mlp", "mlp"], "distinct")])
def test_the_spec_refuses_bad_implants_naming_the_field(value, words):
    spec = {"model": {"source": "builtin:micro-llama"}, "prune": {"implants": value}}
    with pytest.raises(ValidationError) as err:
        parse_spec(spec)
    assert any(e["loc"][:2] == ("prune", "implants") for e in err.value.errors()) and words in str(err.value)
    assert parse_spec({**spec, "prune": {"implants": ["mlp", "attn"]}}).prune.implants == ["attn", "mlp"]


def test_configuration_rebuild_loads_the_fitted_implants(random_llama, implant_db, monkeypatch):
    """`configuration.rebuild` (a downloaded configuration applied to the dense model) gives the search's model."""
    weights = candidate.LevelWeights(implant_db, random_llama.model.layers[0].self_attn.o_proj.weight)
    want = candidate.build(random_llama, implant_db, GENOME, weights=weights)
    monkeypatch.setattr(database, "build", lambda *a, **k: implant_db)  # the database the job built, found again
    monkeypatch.setattr("workers.job_inputs.token_pools", lambda *a: {"database": _calibration(random_llama)})
    layout = levels.layout(GENOME, implant_db.orders, implant_db.table)
    document = {**layout.to_dict(), "parameters": slicing.count_parameters(want), "genome": GENOME.to_dict(),
                "level_table": implant_db.table.to_dict(), "data": {}, "seed": 0,
                "database": {"criterion": "wanda_sp", "options": {}, "key": implant_db.key}}
    rebuilt = configuration.rebuild(copy.deepcopy(random_llama), None, document)
    tokens = _calibration(random_llama, n=2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens).logits, want(tokens).logits, atol=1e-6, rtol=0)


def test_implants_fitted_a_few_layers_at_a_time_are_the_same(random_llama, implant_db, tmp_path, monkeypatch):
    monkeypatch.setattr(database, "IMPLANT_MOMENT_BYTES", 1)  # one layer per pass over the calibration
    again = database.build(random_llama, _calibration(random_llama), criterion="wanda_sp", table=implant_db.table,
                           root=tmp_path / "other")
    assert again.built and again.key == implant_db.key
    for i in range(3):
        for kind in ("attn", "mlp"):
            for level in implant_db.table.implant_levels(kind):
                a, b = implant_db.load_implant(i, kind, level), again.load_implant(i, kind, level)
                torch.testing.assert_close(a["out"] @ a["in"], b["out"] @ b["in"], atol=1e-5, rtol=1e-5)  # the map


@pytest.mark.parametrize("kind", ["llama_bias", "qwen2_bias"])
def test_implants_keep_the_output_bias_through_export(kind, tmp_path):
    model = tiny_model(kind)
    d = slicing.dims(model)
    keep = [slicing.LayerLayout(tuple(range(2)), tuple(range(48))) for _ in range(3)]
    keep[0] = slicing.LayerLayout((), tuple(range(48)), (("attn", 5),))
    keep[2] = slicing.LayerLayout((1,), (), (("mlp", 7),))
    sliced = slicing.slice_model(model, slicing.Layout(tuple(keep)))
    generator = torch.Generator().manual_seed(0)
    for block in (sliced.model.layers[0].self_attn, sliced.model.layers[2].mlp):
        implants.load_into(block, {"in": torch.randn(block.rank, d.hidden, generator=generator),
                                   "out": torch.randn(d.hidden, block.rank, generator=generator)})
    slicing.save_pruned(sliced, None, tmp_path / "m")
    loaded = export.load(tmp_path / "m")
    tokens = _calibration(model, n=2, t=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, sliced(tokens).logits, atol=1e-6, rtol=0)
    assert slicing.count_parameters(loaded) == slicing.count_parameters(sliced)
    assert loaded.model.layers[0].self_attn.o_bias is not None or kind == "qwen2_bias"  # qwen2: no o_proj bias


def test_the_evolution_searches_implants_and_resumes_to_the_same_run():
    import json

    from search import strategies
    from search.genome import LevelSpace
    from search.strategy import Stage

    space = LevelSpace(n_layers=6, attn_levels=4, mlp_levels=4, attn_unit_params=1_000, mlp_level_params=300,
                       dense_params=10**6, attn_implant_levels=(2, 3), mlp_implant_levels=(3,))
    start = space.uniform(0.5)
    plan = strategies.Plan(generations=3, offspring=4, stages=(Stage(2, 64), Stage(1, 128)))

    def build():
        return strategies.build("evolution", space, start, seed=7, key=1, plan=plan)

    def fitness(genome):  # implants help late layers' MLPs, hurt attention
        return float(sum(a * a + m * m for a, m in zip(genome.attn, genome.mlp, strict=True))
                     + sum(1.0 if kind == "attn" else -0.5 * i for i, kind in genome.implants))

    def run(strategy, stop_after=None):
        asked, told = [], 0
        while not strategy.finished:
            for request in strategy.ask():
                asked.append(request)
                if told == stop_after:
                    return asked
                strategy.tell(request.candidate_id, fitness(request.genome))
                told += 1
        return asked

    full = build()
    everything = run(full)
    assert any(r.genome.implants for r in everything)
    assert all(space.params(r.genome) == space.params(start) for r in everything)
    part = build()
    first = run(part, stop_after=9)
    resumed = build()
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert first[:9] + run(resumed) == everything and resumed.best == full.best
