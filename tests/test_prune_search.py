"""The DarwinLM-style search end to end: spec and stages, top-k KL, budget-exact mutation on a real model,
evaluation in place, the exported winner, and identical fronts with 1 and 2 Ray evaluators."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from pydantic import ValidationError

from darwinfront.core.methods import parse_spec
from darwinfront.core.spec import SearchSpec
from search.evolution import Evolution
from search.genome import PruneGenome
from search.mutation import offspring
from workers import criteria, fitness, latency, levels, metrics, slicing
from workers.prune_job import stages_for

pytest_plugins = ["service_fixtures"]

BASE = {"model": {"source": "builtin:micro-llama", "device": "cpu"}}
# A micro job that trains every candidate: 2 targets, 2 generations of 4 offspring, stages 2/1.
MICRO = {
    **BASE,
    "data": {"calibration_tokens": 512, "train_tokens": 2048, "database_tokens": 2048, "eval_tokens": 256,
             "seq_len": 64},
    "prune": {"targets": [0.25, 0.5], "levels": 16},
    "search": {"generations": 2, "offspring": 4, "train_tokens": [256, 512]},
    "seed": 5,
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_spec_accepts_every_registered_criterion_and_only_those():
    assert {"obs", "flap", "gate", "gate_fisher", "gate_spsa", "wanda_sp"} <= set(criteria.names())
    for name in criteria.names():
        assert parse_spec({**BASE, "prune": {"criterion": name}}).prune.criterion == name
    with pytest.raises(ValidationError, match="unknown criterion 'snip'"):
        parse_spec({**BASE, "prune": {"criterion": "snip"}})


def test_spec_defaults_are_the_scaled_paper_schedule():
    spec = parse_spec(BASE)
    assert (spec.prune.criterion, spec.prune.levels, spec.prune.mlp_multiple) == ("obs", 10, 8)
    assert spec.prune.training_aware and spec.prune.attention_unit == "kv_group" and spec.search.kl_topk == "auto"
    assert (spec.search.offspring, spec.search.survivors) == (16, [8, 4, 2, 1])
    assert spec.search.fitness_tokens == [256, 512, 1024, 2048]
    assert spec.search.train_tokens == [2048, 8192, 16384, 32768]
    assert 1e-4 <= spec.prune.train_lr <= 5e-4
    # 1 + generations * (16 offspring + 8 + 4 + 2 survivors + the parent) per target
    assert spec.planned_evaluations() == 1 + 30 * 31
    two = parse_spec({**BASE, "prune": {"targets": [0.3, 0.5]}, "search": {"generations": 3}})
    assert two.planned_evaluations() == 2 * (1 + 3 * 31)


def test_search_stages_follow_the_offspring_and_are_checked():
    assert SearchSpec(offspring=4).survivors == [2, 1]
    assert SearchSpec(offspring=4).fitness_tokens == [1024, 2048]
    assert SearchSpec(offspring=4).train_tokens == [16384, 32768]
    assert SearchSpec(offspring=4).evaluations_per_generation() == 4 + 2 + 1
    bad = {
        "lengths": {"survivors": [2, 1], "fitness_tokens": [8]},
        "last keeps one": {"survivors": [2, 2], "fitness_tokens": [8, 8], "train_tokens": [0, 0]},
        "increasing": {"survivors": [1, 2, 1], "fitness_tokens": [8] * 3, "train_tokens": [0] * 3},
        "more than offspring": {"offspring": 2, "survivors": [3, 1], "fitness_tokens": [8] * 2,
                                "train_tokens": [0] * 2},
    }
    for fields in bad.values():
        with pytest.raises(ValidationError):
            SearchSpec.model_validate(fields)
    with pytest.raises(ValidationError, match="training pool"):
        parse_spec({**BASE, "data": {"train_tokens": 0}})
    assert parse_spec({**BASE, "data": {"train_tokens": 0}, "prune": {"training_aware": False}})


def test_stages_cap_fitness_tokens_at_the_pool_and_train_only_when_training_aware():
    spec = parse_spec({**BASE, "data": {"calibration_tokens": 640, "seq_len": 64}})
    stages = stages_for(spec, calibration_sequences=10)
    assert [(s.survivors, s.fitness_tokens, s.train_tokens) for s in stages] == [
        (8, 256, 2048), (4, 512, 8192), (2, 640, 16384), (1, 640, 32768)
    ]
    off = parse_spec({**BASE, "prune": {"training_aware": False}})
    assert all(s.train_tokens == 0 for s in stages_for(off, calibration_sequences=16))


def test_topk_kl_is_a_lower_bound_exact_with_one_token_out_and_zero_for_the_teacher(random_llama):
    tokens = torch.randint(random_llama.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    vocab = random_llama.config.vocab_size
    full = fitness.Teacher.of(random_llama, tokens)
    all_k = fitness.Teacher.of(random_llama, tokens, topk=vocab - 1)
    top8 = fitness.Teacher.of(random_llama, tokens, topk=8)
    assert top8.top_indices.shape == (4, 11, 8)
    assert fitness.kl(random_llama, tokens, top8) == pytest.approx(0.0, abs=1e-6)
    student = copy.deepcopy(random_llama)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.0)
    exact = fitness.kl(student, tokens, full)  # test_metrics holds the full KL to a numpy sum
    assert fitness.kl(student, tokens, all_k) == pytest.approx(exact, rel=1e-5)  # one token left out: no loss
    assert 0.0 < fitness.kl(student, tokens, top8) < exact
    rows = torch.tensor([1, 3])
    assert fitness.kl(student, tokens[rows], top8.select(rows)) > 0.0
    kl, ppl = fitness.kl_and_perplexity(student, tokens, full)
    assert kl == pytest.approx(exact) and ppl == pytest.approx(metrics.perplexity(student, tokens, batch_size=3))


def test_topk_teacher_gives_held_out_kl_and_the_same_perplexity_in_a_fraction_of_the_bytes(random_llama):
    tokens = torch.randint(random_llama.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(1))
    student = copy.deepcopy(random_llama)
    with torch.no_grad():
        student.model.layers[1].self_attn.o_proj.weight.mul_(0.5)
    full = fitness.Teacher.of(random_llama, tokens, batch_size=2)
    top8 = fitness.Teacher.of(random_llama, tokens, topk=8)
    kl_full, ppl_full = fitness.kl_and_perplexity(student, tokens, full, batch_size=2)
    kl_top, ppl_top = fitness.kl_and_perplexity(student, tokens, top8, batch_size=3)
    assert ppl_top == pytest.approx(ppl_full) and 0.0 < kl_top < kl_full
    assert kl_top == pytest.approx(fitness.kl(student, tokens, top8))
    assert full.nbytes == 5 * 11 * random_llama.config.vocab_size * 4 and top8.nbytes == 5 * 11 * 8 * 12


def test_auto_topk_keeps_full_tables_up_to_a_65536_vocabulary():
    assert fitness.resolve_topk("auto", 49_152) is None and fitness.resolve_topk("auto", 65_536) is None
    assert fitness.resolve_topk("auto", 151_936) == fitness.AUTO_TOPK == 256
    assert fitness.resolve_topk(None, 262_144) is None and fitness.resolve_topk(64, 262_144) == 64
    assert fitness.resolve_topk(4096, 2048) is None  # k covering the vocabulary is the full KL


def test_level_switch_offspring_keep_the_real_parameter_count(random_llama):
    table = levels.table_for(random_llama, levels=6, multiple=8)
    space = levels.level_space(random_llama, table)
    orders = [{"attn": [1, 0], "mlp": list(range(table.mlp_units))}] * space.n_layers
    parent = space.uniform(0.5)
    children = offspring(parent, space, random.Random(0), 16, seen=set())
    assert len({c.key() for c in children}) == 16 and parent.key() not in {c.key() for c in children}
    target = space.params(parent)
    for child in children:
        assert (sum(child.attn), sum(child.mlp)) == (sum(parent.attn), sum(parent.mlp))
        sliced = slicing.slice_model(copy.deepcopy(random_llama), levels.layout(child, orders, table))
        assert slicing.count_parameters(sliced) == target


def test_parent_joins_only_the_last_stage_by_index(random_llama):
    space = levels.level_space(random_llama, levels.table_for(random_llama, levels=6, multiple=8))
    spec = parse_spec({**BASE, "search": {"offspring": 8}})
    stages = stages_for(spec, calibration_sequences=32)
    run = Evolution(space, space.uniform(0.5), seed=0, key=0, generations=1, offspring=8, stages=stages,
                    score_parent_at_start=False)
    seen_sizes = []
    while not run.finished:
        batch = run.ask()
        seen_sizes.append((len(batch), sum(r.is_parent for r in batch)))
        assert len({r.seed for r in batch}) == 1  # one stage, one seed: the same minibatches for everyone
        for r in batch:
            run.tell(r.candidate_id, float(sum(r.genome.mlp[:1]) + 0.01 * sum(r.genome.attn[:1])))
    assert seen_sizes == [(8, 0), (4, 0), (2 + 1, 1)]


def test_forward_latency_is_measured(random_llama):
    timing = latency.forward_latency(random_llama, seq_len=16, repeats=3, warmup=1)
    assert timing["median_ms"] > 0 and timing["min_ms"] <= timing["median_ms"] and timing["repeats"] == 3


def test_configuration_layout_keeps_what_the_genome_says(random_llama):
    table = levels.table_for(random_llama, levels=6, multiple=8)
    orders = [{"attn": [1, 0], "mlp": list(range(47, -1, -1))}] * 3
    layout = levels.layout(PruneGenome(attn=(1, 0, 2), mlp=(1, 0, 6)), orders, table)
    assert layout.layers[0].attn_units == (0,) and layout.layers[1].attn_units == (0, 1)
    assert layout.layers[2].attn_units == () and layout.layers[2].mlp_channels == ()
    assert layout.layers[0].mlp_channels == tuple(range(40))  # level 1 removes the first 8 of the order


@pytest.mark.integration
def test_evaluation_restores_the_model_and_the_exported_winner_reloads_to_its_logits(micro_dir, tmp_path,
                                                                                      monkeypatch):
    from workers.evaluator import Evaluator
    from workers.prepare import prepare

    micro = {**MICRO, "prune": {**MICRO["prune"], "train_loss": "kd"}}  # the export replays distillation too
    spec = parse_spec(micro).model_dump(mode="json")
    prepared = prepare(spec)
    evaluator = Evaluator(spec, prepared)
    model = evaluator.inputs.model
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    genome = PruneGenome(attn=(1, 0), mlp=(5, 11))
    request = {"candidate_id": "c", "genome": genome.to_dict(), "target": 0.5, "generation": 1, "stage": 1,
               "seed": 11, "sequences": 8, "train_tokens": 512, "final": True}
    reply = evaluator.evaluate(request)
    assert "error" not in reply and reply["train_seconds"] > 0 and reply["compute_seconds"] <= reply["seconds"]
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # put back, bit for bit
    untrained = evaluator.evaluate({**request, "train_tokens": 0})
    assert untrained["kl"] != pytest.approx(reply["kl"], rel=1e-3)  # the training changed the fitness
    failed = evaluator.evaluate({**request, "genome": {"attn": [1, 0], "mlp": [99, 0]}})
    assert "InvalidSpec" in failed["error"] and "kl" not in failed and evaluator.current is None
    from workers import finetune

    def step_then_fail(*args, **kwargs):  # a training that dies after moving the shared weights
        real_step(*args, **kwargs)
        raise RuntimeError("out of memory")

    real_step = finetune.train_step
    monkeypatch.setattr(finetune, "train_step", step_then_fail)
    failed = evaluator.evaluate(request)
    monkeypatch.undo()
    assert failed["error"] == "RuntimeError: out of memory" and evaluator.current is None
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())

    configuration = evaluator.configuration(request, {"candidate_id": "c", "target": 0.5, "kl": reply["kl"]})
    assert configuration["weights"] == "trained" and configuration["training"]["seed"] == 11
    assert configuration["training"]["loss"] == "kd"
    exported = evaluator.export(configuration, str(tmp_path / "c"))
    assert exported["params"] == reply["params"] == configuration["parameters"]
    assert exported["latency_ms"] > 0 and exported["dense_latency_ms"] > 0
    reloaded, _ = slicing.load_pruned(tmp_path / "c")
    tokens = evaluator.inputs.calibration
    evaluator.load(genome, train_tokens=512, seed=11)
    with torch.inference_mode():
        expected = evaluator.current(tokens).logits
        assert torch.allclose(reloaded(tokens).logits, expected, atol=1e-5)
    evaluator.unload()
    kl = fitness.kl(reloaded, tokens, evaluator.teacher)
    assert kl == pytest.approx(reply["kl"], rel=1e-4)


def _run_job(store, redis_url: str, data_dir, evaluators: int) -> str:
    from workers.prune_job import PruneJob

    spec = parse_spec({**MICRO, "resources": {"evaluators": evaluators}})
    job = store.create("alpha", spec.model_dump(mode="json"))
    PruneJob(store, job.id, redis_url=redis_url, data_dir=data_dir).run()
    return job.id


@pytest.mark.integration
def test_identical_fronts_with_one_and_two_evaluators(micro_dir, store, redis_server, tmp_path):
    import ray

    from workers import tracking
    from workers.pool import init_ray

    init_ray(num_cpus=2)
    try:
        one = _run_job(store, redis_server.url, tmp_path, evaluators=1)
        two = _run_job(store, redis_server.url, tmp_path, evaluators=2)
    finally:
        ray.shutdown()
    runs = [tracking.recorded(tracking.open_study(redis_server.url, job)) for job in (one, two)]
    assert len(runs[0]) == parse_spec(MICRO).planned_evaluations()
    assert runs[0].keys() == runs[1].keys()
    for cid, result in runs[0].items():
        assert runs[1][cid]["kl"] == pytest.approx(result["kl"], rel=1e-5), cid
    fronts = [store.get_front(job)["points"] for job in (one, two)]
    assert [p["candidate_id"] for p in fronts[0]] == [p["candidate_id"] for p in fronts[1]]
    assert [p["objectives"]["params"] for p in fronts[0]] == [p["objectives"]["params"] for p in fronts[1]]
    assert {p["target"] for p in fronts[0]} == {0.25, 0.5}  # the front spans both sizes
    for point in fronts[0]:
        assert point["latency_ms"] > 0 and point["perplexity"] > 1 and point["held_out_kl"] >= 0
        genomes = [store.get_result(job, point["candidate_id"])["genome"] for job in (one, two)]
        assert genomes[0] == genomes[1]


def _toy_fitness(genome: PruneGenome) -> float:
    """A separable toy objective: the later layers are the cheap ones to prune."""
    attn = sum((3 - i) * a for i, a in enumerate(genome.attn))
    return attn + sum((3 - i) * 0.5 * m for i, m in enumerate(genome.mlp))


def test_nsga_baseline_keeps_the_budget_and_improves_deterministically():
    from search.genome import LevelSpace
    from search.nsga import NsgaSearch, repair

    assert sum(repair([4, 4, 0, 0], 3, 4, random.Random(0))) == 3
    assert repair([0, 0, 0], 5, 2, random.Random(0)) in {(2, 2, 1), (2, 1, 2), (1, 2, 2)}
    space = LevelSpace(n_layers=4, attn_levels=4, mlp_levels=8, attn_unit_params=10, mlp_level_params=3,
                       dense_params=1000)
    start = space.uniform(0.5)
    bests = []
    for _ in range(2):
        run = NsgaSearch(space, start, seed=3, key=0, budget=60, population=8)
        asked = []
        while not run.finished:
            for request in run.ask(limit=5):
                asked.append(request.genome)
                run.tell(request.candidate_id, _toy_fitness(request.genome))
        assert asked[0] == start and len(asked) == 60 == run.evaluations
        assert len({g.key() for g in asked}) == 60  # distinct evaluations only
        assert all(space.params(g) == space.params(start) for g in asked)
        bests.append((run.best.key(), run.best_fitness))
    assert bests[0] == bests[1] and bests[0][1] < _toy_fitness(start)
