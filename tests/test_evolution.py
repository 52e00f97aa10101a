"""Staged (1+λ) evolution on toy objectives: stage shapes, shared seeds, known optimum, order and restore."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from search.evolution import DEFAULT_STAGES, Evolution
from search.genome import LevelSpace, PruneGenome
from search.seeding import derive_seed
from search.strategy import Request, Stage

SPACE = LevelSpace(
    n_layers=8, attn_levels=4, mlp_levels=4, attn_unit_params=1_000, mlp_level_params=300, dense_params=10**6
)
START = SPACE.uniform(0.5)  # level 2 everywhere: sums 16 and 16


def layer_cost(genome: PruneGenome) -> float:
    """Additively separable and convex per layer: early attention and late MLP layers are the sensitive ones."""
    n = len(genome.attn)
    pairs = enumerate(zip(genome.attn, genome.mlp, strict=True))
    return float(sum((n - i) * a * a + (i + 1) * 0.7 * m * m for i, (a, m) in pairs))


def optimum(weights, total, top):
    """Minimum of sum(w_i x_i^2) over integer 0 <= x_i <= top with sum total, by dynamic programming."""
    best = {0: 0.0}  # level sum so far -> least cost
    for w in weights:
        step = {}
        for s, c in best.items():
            for x in range(min(top, total - s) + 1):
                step[s + x] = min(step.get(s + x, float("inf")), c + w * x * x)
        best = step
    return best[total]


def drive(evo, fitness, *, order=None, limit=None, stop_after=None):
    """Run `evo` to the end (or until `stop_after` generations); returns every request in the order asked.

    With `order` (a random.Random) requests are asked in random chunks and told in random order, interleaved,
    the way many evaluators finishing at different times would.
    """
    asked, pending = [], []
    while not evo.finished and (stop_after is None or evo.generation < stop_after):
        fresh = evo.ask(limit if order is None else order.randint(1, 4))
        asked.extend(fresh)
        pending.extend(fresh)
        if order is not None:
            order.shuffle(pending)
            told = pending[: order.randint(1, len(pending))] if pending else []
        else:
            told = list(pending)
        for request in told:
            pending.remove(request)
            evo.tell(request.candidate_id, fitness(request))
    return asked


def cost(request):
    return layer_cost(request.genome)


def test_default_schedule_shapes_each_generation():
    evo = Evolution(SPACE, START, seed=3, key=0, generations=2)
    shapes = []
    while not evo.finished:
        batch = evo.ask()
        shapes.append((batch[0].generation, batch[0].stage, len(batch), [r.is_parent for r in batch].count(True)))
        for request in batch:
            evo.tell(request.candidate_id, cost(request))
    assert shapes == [
        (0, 3, 1, 1),
        (1, 0, 16, 0),
        (1, 1, 8, 0),
        (1, 2, 4, 0),
        (1, 3, 3, 1),
        (2, 0, 16, 0),
        (2, 1, 8, 0),
        (2, 2, 4, 0),
        (2, 3, 3, 1),
    ]
    assert evo.evaluations == 1 + 2 * 31 and evo.generation == 2


def test_candidate_ids_and_generation_zero():
    evo = Evolution(SPACE, START, seed=3, key=7, generations=1)
    (first,) = evo.ask()
    assert first.candidate_id == "t7-g0-s3-cp" and first.genome == START and first.is_parent
    assert first.stage_spec == DEFAULT_STAGES[-1]
    evo.tell(first.candidate_id, 5.0)
    assert evo.parent_fitness == 5.0 and evo.generation == 0
    assert [r.candidate_id for r in evo.ask()] == [f"t7-g1-s0-c{i}" for i in range(16)]


def test_parent_enters_by_stage_index_not_survivor_count():
    # DarwinLM inserts the parent when a stage keeps one survivor; with (4, 1, 1) that would be stage 1.
    stages = (Stage(4, 64), Stage(1, 128), Stage(1, 256))
    asked = drive(Evolution(SPACE, START, seed=1, key=0, generations=3, offspring=6, stages=stages), cost)
    per_stage = {}
    for request in asked:
        per_stage.setdefault((request.generation, request.stage), []).append(request.is_parent)
    for generation in (1, 2, 3):
        assert per_stage[(generation, 0)] == [False] * 6
        assert per_stage[(generation, 1)] == [False] * 4
        assert per_stage[(generation, 2)] == [False, True]


def test_single_stage_schedule_scores_offspring_and_parent_together():
    evo = Evolution(
        SPACE, START, seed=1, key=0, generations=1, offspring=5, stages=(Stage(1, 64),), score_parent_at_start=False
    )
    batch = evo.ask()
    assert [r.is_parent for r in batch] == [False] * 5 + [True] and {r.stage for r in batch} == {0}


def test_all_requests_of_a_stage_share_one_seed():
    evo = Evolution(SPACE, START, seed=11, key=2, generations=3)
    seeds = {}
    for request in drive(evo, cost):
        seeds.setdefault((request.generation, request.stage), set()).add(request.seed)
    assert all(len(s) == 1 for s in seeds.values())
    last = len(evo.state_dict()["settings"]["stages"]) - 1
    assert seeds[(2, 1)] == {derive_seed(11, 2, 2, 1)}
    assert seeds[(2, last)] == seeds[(1, last)] == {derive_seed(11, 2, "final", last)}  # one last stage for all
    early = [next(iter(s)) for (_, stage), s in seeds.items() if stage != last]
    assert len(set(early)) == len(early)  # earlier stages draw afresh every generation and stage


def test_the_parent_score_per_target_only_goes_down_when_the_last_stage_is_deterministic():
    """With the last stage scored on fixed terms, a cost that depends on (genome, seed) gives a monotone best."""
    evo = Evolution(SPACE, START, seed=5, key=0, generations=6)

    def noisy(request):
        return cost(request) + (request.seed % 1000) * 1e-3  # the same genome scores differently per seed

    drive(evo, noisy)
    bests = [entry["parent_fitness"] for entry in evo.history]
    assert len(bests) == 7 and bests == sorted(bests, reverse=True) and bests[-1] < bests[0]
    kept = [e for e in evo.history[1:] if not e["changed"]]
    assert all(e["incumbent_fitness"] == e["parent_fitness"] for e in kept)  # a kept parent re-scores the same


def test_finds_the_optimum_of_a_separable_convex_toy():
    n = SPACE.n_layers
    best = optimum([n - i for i in range(n)], 16, 4) + optimum([(i + 1) * 0.7 for i in range(n)], 16, 4)
    evo = Evolution(SPACE, START, seed=5, key=0, generations=60)
    drive(evo, cost)
    assert layer_cost(START) > best + 20
    assert evo.parent_fitness == pytest.approx(best)
    assert SPACE.params(evo.parent) == SPACE.params(START)
    fitnesses = [entry["parent_fitness"] for entry in evo.history]
    assert fitnesses == sorted(fitnesses, reverse=True)  # deterministic fitness: elitism never loses ground


def test_offspring_are_never_repeated_within_a_run():
    evo = Evolution(SPACE, START, seed=6, key=0, generations=15)
    firsts = [r.genome.key() for r in drive(evo, cost) if r.stage == 0]
    assert len(firsts) == 15 * 16 == len(set(firsts)) and START.key() not in firsts


def test_tell_order_does_not_change_the_run():
    def run(order):
        evo = Evolution(SPACE, START, seed=9, key="x", generations=8)
        asked = drive(evo, cost, order=order)
        return sorted(json.dumps(r.to_dict(), sort_keys=True) for r in asked), evo.history, evo.parent

    reference = run(None)
    for shuffle_seed in (0, 1, 2):
        assert run(random.Random(shuffle_seed)) == reference


def test_ties_keep_the_parent():
    evo = Evolution(SPACE, START, seed=2, key=0, generations=4)
    drive(evo, lambda request: 1.0)
    assert evo.parent == START and not any(entry["changed"] for entry in evo.history)


def test_failed_candidates_are_never_selected():
    def flaky(request):  # genomes that prune layer 0's attention further than the start fail
        return None if request.genome.attn[0] > START.attn[0] else cost(request)

    evo = Evolution(SPACE, START, seed=4, key=0, generations=20)
    asked = drive(evo, flaky)
    assert evo.parent.attn[0] <= START.attn[0]
    assert any(flaky(r) is None for r in asked)
    promoted = [r for r in asked if r.stage > 0 and not r.is_parent]
    assert all(flaky(r) is not None for r in promoted)
    assert sum(entry["failures"] for entry in evo.history) == sum(flaky(r) is None for r in asked)


def test_a_stage_where_everything_fails_keeps_the_parent_and_moves_on():
    evo = Evolution(SPACE, START, seed=4, key=0, generations=3)
    drive(evo, lambda r: 2.0 if r.is_parent else (None if r.generation == 2 else 3.0))
    second = evo.history[2]
    assert second["generation"] == 2 and second["failures"] == 16 and not second["changed"]
    assert second["best_fitness"] is None and second["incumbent_fitness"] is None
    assert evo.generation == 3 and evo.parent == START and evo.parent_fitness == 2.0


def test_nan_and_inf_count_as_failures():
    evo = Evolution(SPACE, START, seed=4, key=0, generations=1, offspring=2, stages=(Stage(1, 8),))
    evo.tell(evo.ask()[0].candidate_id, 1.0)
    a, b, parent = evo.ask()
    evo.tell(a.candidate_id, float("nan"))
    evo.tell(b.candidate_id, float("-inf"))
    evo.tell(parent.candidate_id, 3.0)
    assert evo.parent == START and evo.parent_fitness == 3.0 and evo.history[-1]["failures"] == 2


def test_unknown_duplicate_and_unasked_tells_raise():
    evo = Evolution(SPACE, START, seed=4, key=0, generations=1)
    with pytest.raises(ValueError, match="unknown"):
        evo.tell("t0-g0-s3-cp", 1.0)  # exists, but not asked yet
    (request,) = evo.ask()
    with pytest.raises(ValueError, match="unknown"):
        evo.tell("t0-g9-s0-c0", 1.0)
    evo.tell(request.candidate_id, 1.0)
    with pytest.raises(ValueError):
        evo.tell(request.candidate_id, 1.0)
    assert evo.evaluations == 1


def test_ask_is_empty_while_results_are_pending():
    evo = Evolution(SPACE, START, seed=4, key=0, generations=1, score_parent_at_start=False)
    assert len(evo.ask(10)) == 10 and len(evo.ask()) == 6 and evo.ask() == []
    assert evo.stage == 0 and evo.parent_fitness is None


def test_restore_from_a_checkpoint_continues_like_the_uninterrupted_run():
    def make():
        return Evolution(SPACE, START, seed=21, key=1, generations=10, offspring=8, stages=(Stage(4, 8), Stage(1, 16)))

    full = make()
    full_asked = drive(full, cost)

    part = make()
    drive(part, cost, stop_after=4)
    state = json.loads(json.dumps(part.state_dict()))  # must survive JSON
    restored = make()
    restored.load_state_dict(state)
    rest = drive(restored, cost)
    assert rest == [r for r in full_asked if r.generation > 4]
    assert restored.parent == full.parent and restored.history == full.history
    assert restored.evaluations == full.evaluations and restored.finished


def test_restore_mid_stage_hands_out_the_missing_requests_again():
    evo = Evolution(SPACE, START, seed=8, key=0, generations=2, score_parent_at_start=False)
    batch = evo.ask()
    for request in batch[:5]:
        evo.tell(request.candidate_id, cost(request))
    restored = Evolution(SPACE, START, seed=8, key=0, generations=2, score_parent_at_start=False)
    restored.load_state_dict(json.loads(json.dumps(evo.state_dict())))
    assert restored.ask() == batch[5:]
    for request in batch[5:]:
        restored.tell(request.candidate_id, cost(request))
        evo.tell(request.candidate_id, cost(request))
    assert restored.ask() == evo.ask()


def test_exhausted_space_ends_the_run_early():
    tiny = LevelSpace(
        n_layers=2, attn_levels=1, mlp_levels=1, attn_unit_params=10, mlp_level_params=5, dense_params=100
    )
    start = PruneGenome(attn=(1, 0), mlp=(0, 1))
    evo = Evolution(tiny, start, seed=0, key=0, generations=50, offspring=16)
    drive(evo, cost)
    # Three genomes besides the start exist, so generation 1 takes them all and generation 2 has none:
    # start once, then 3 + 3 + 3 in stages 0-2 and the best 2 with the parent in stage 3.
    assert evo.finished and evo.exhausted and evo.generation == 1
    assert evo.evaluations == 1 + 3 + 3 + 3 + 3


def test_request_round_trips_through_json():
    evo = Evolution(SPACE, START, seed=1, key=0, generations=1, score_parent_at_start=False)
    request = evo.ask()[3]
    assert Request.from_dict(json.loads(json.dumps(request.to_dict()))) == request


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Stage(0, 8)
    with pytest.raises(ValueError):
        Evolution(SPACE, START, seed=0, key=0, generations=1, stages=())
    with pytest.raises(ValueError):
        Evolution(SPACE, PruneGenome(attn=(9,) * 8, mlp=(0,) * 8), seed=0, key=0, generations=1)


def test_derived_seeds_are_stable_typed_and_63_bit():
    # Pinned: checkpoints written by an older run must keep drawing the same candidates after an upgrade.
    assert derive_seed(1, "a", 2) == 7676051699891491324
    assert derive_seed(1) != derive_seed("1") and derive_seed("a", "b") != derive_seed("ab")
    assert derive_seed(1, 2) != derive_seed(2, 1) and derive_seed(-1) != derive_seed(1)
    assert all(0 <= derive_seed(i, "x") < 2**63 for i in range(200))
    with pytest.raises(TypeError):
        derive_seed(1.0)
    with pytest.raises(TypeError):
        derive_seed(True)


def test_derived_seeds_do_not_depend_on_the_process_hash_salt():
    code = "from search.seeding import derive_seed; print(derive_seed(5, 'target', 3))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": str(Path(__file__).parents[1])},
        ).stdout.strip()
        for salt in ("1", "2")
    }
    assert outputs == {str(derive_seed(5, "target", 3))}


def test_the_search_package_stays_pure():
    """Every module of `search/` imports with torch, Ray, Redis and transformers made unimportable (Optuna, which
    imports Redis only when it is there, stays usable)."""
    code = (
        "import sys, pkgutil, importlib, search\n"
        "for name in ('torch', 'ray', 'redis', 'transformers'): sys.modules[name] = None\n"
        "modules = sorted(m.name for m in pkgutil.iter_modules(search.__path__, 'search.'))\n"
        "for module in modules: importlib.import_module(module)\n"
        "print(len(modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(list((Path(__file__).parents[1] / "search").glob("[a-z]*.py")))
