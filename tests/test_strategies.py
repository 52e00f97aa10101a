"""Every registered strategy and the KV search speak the ask/tell interface: budget, determinism, resume.

Toy objectives only (no torch): what is checked is the protocol, not the quality of the search.
"""

from __future__ import annotations

import json

import optuna
import pytest
from pydantic import ValidationError

from darwinfront.core.methods import parse_spec
from search import strategies
from search.genome import LevelSpace, PruneGenome
from search.kv_search import OBJECTIVES, KVSearch
from search.kv_space import KVGroup, KVSpace
from search.nirvana import UnitSaliency
from search.strategy import Stage

SPACE = LevelSpace(
    n_layers=6, attn_levels=4, mlp_levels=4, attn_unit_params=1_000, mlp_level_params=300, dense_params=10**6
)
START = SPACE.uniform(0.5)
PLAN = strategies.Plan(generations=3, offspring=4, stages=(Stage(2, 64), Stage(1, 128)))  # 4 + 2 + 1 per generation
# unit scores for the strategies that read them: 4 attention units (1 per level), 32 MLP channels (8 per level)
SALIENCY = UnitSaliency(
    attn=[[(i + 1) * (u + 1) for u in range(4)] for i in range(6)],
    mlp=[[(6 - i) * (c + 1) / 8 for c in range(32)] for i in range(6)], attn_step=1, mlp_step=8,
)
# strategies that plan each round from the results so far: they may end before the budget, their genomes do not
# depend on the seed (only the data seed does), and some requests are off the target size (not final)
ADAPTIVE = {"pagcp", "nirvana", "depth"}


def toy(genome: PruneGenome) -> float:
    """Separable: early attention and late MLP layers are the sensitive ones."""
    pairs = enumerate(zip(genome.attn, genome.mlp, strict=True))
    return float(sum((len(genome.attn) - i) * a * a + (i + 1) * m * m for i, (a, m) in pairs))


def run(strategy, fitness, *, stop_after: int | None = None) -> list:
    """Ask everything available and tell it in ask order, until finished or `stop_after` tells; the asked."""
    asked, told = [], 0
    while not strategy.finished:
        batch = strategy.ask()
        assert batch, "not finished, yet nothing to ask with nothing pending"
        asked += batch
        for request in batch:
            if told == stop_after:
                return asked
            strategy.tell(request.candidate_id, fitness(request))
            told += 1
    return asked


def build(name: str, seed: int = 7):
    return strategies.build(name, SPACE, START, seed=seed, key=1, plan=PLAN, saliency=SALIENCY)


@pytest.mark.parametrize("name", strategies.names())
def test_every_strategy_spends_its_planned_budget_at_the_target_size(name):
    strategy = build(name)
    failed = set()

    def fitness(request):
        if request.genome != START and len(failed) < 2:  # two failures are evaluations too
            failed.add(request.candidate_id)
            return float("nan")
        return toy(request.genome)

    asked = run(strategy, fitness)
    planned = strategies.planned_evaluations(name, generations=3, offspring=4, survivors=PLAN.survivors)
    assert planned == (1 if name == "uniform" else 1 + 3 * 7)
    assert strategy.finished and strategy.ask() == []
    if name in ADAPTIVE:
        assert strategy.evaluations == len(asked) <= planned and strategy.rounds >= 2
    else:
        assert strategy.evaluations == len(asked) == planned
        assert strategy.rounds == (1 if name == "uniform" else 4)  # the start, then one round per generation
    assert asked[0].genome == START and asked[0].is_parent
    step = max(SPACE.attn_unit_params, SPACE.mlp_level_params)
    for r in asked:
        if not r.final and name in ADAPTIVE:  # partial cuts on the way (greedy steps, block ablations)
            assert SPACE.params(r.genome) > SPACE.params(START)
        elif name == "nirvana":  # its own attention / MLP balance, on the level grid, never above the size
            assert 0 <= SPACE.params(START) - SPACE.params(r.genome) <= SPACE.n_layers * step
        else:
            assert SPACE.params(r.genome) == SPACE.params(START)
    finals = [toy(r.genome) for r in asked if r.final and r.candidate_id not in failed]
    assert strategy.best_fitness == min(finals) and toy(strategy.best) == strategy.best_fitness
    with pytest.raises(ValueError):
        strategy.tell(asked[0].candidate_id, 1.0)
    with pytest.raises(ValueError):
        strategy.tell("t1-nobody", 1.0)


@pytest.mark.parametrize("name", strategies.names())
def test_the_same_seed_asks_the_same_requests(name):
    first, second = run(build(name), lambda r: toy(r.genome)), run(build(name), lambda r: toy(r.genome))
    assert first == second
    if name in ADAPTIVE:  # the fitnesses decide the path; the seed draws the data
        assert {r.seed for r in run(build(name, seed=8), lambda r: toy(r.genome))} != {r.seed for r in first}
    elif name != "uniform":
        assert [r.genome for r in run(build(name, seed=8), lambda r: toy(r.genome))] != [r.genome for r in first]


@pytest.mark.parametrize("name", strategies.names())
@pytest.mark.parametrize("stop_after", [1, 5, 12])  # after the start, mid-round, mid-round later
def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(name, stop_after):
    full = build(name)
    full_asked = run(full, lambda r: toy(r.genome))

    part = build(name)
    part_asked = run(part, lambda r: toy(r.genome), stop_after=stop_after)
    state = json.loads(json.dumps(part.state_dict()))  # checkpoints are JSON
    resumed = build(name)
    resumed.load_state_dict(state)
    rest = run(resumed, lambda r: toy(r.genome))

    told = min(stop_after, len(full_asked))
    assert part_asked[:told] + rest == full_asked  # the untold requests come again first, then the same run
    assert (resumed.best, resumed.best_fitness, resumed.evaluations, resumed.rounds) == (
        full.best, full.best_fitness, full.evaluations, full.rounds
    )


@pytest.mark.parametrize("name", strategies.names())
def test_a_state_of_another_strategy_or_a_used_one_is_refused(name):
    other = "random" if name != "random" else "nsga2"
    with pytest.raises(ValueError):
        build(name).load_state_dict(build(other).state_dict())
    used = build(name)
    used.ask()
    with pytest.raises(ValueError):
        used.load_state_dict(build(name).state_dict())


def test_spec_names_a_registered_strategy_and_plans_its_budget():
    base = {"model": {"source": "builtin:micro-llama"}, "prune": {"targets": [0.3, 0.5]}}
    assert parse_spec(base).search.strategy == "evolution"
    for name in strategies.names():
        spec = parse_spec({**base, "search": {"strategy": name, "generations": 3, "offspring": 4}})
        per_target = 1 if name == "uniform" else 1 + 3 * (4 + 2 + 1)
        assert spec.planned_evaluations() == 2 * per_target
    with pytest.raises(ValidationError, match="unknown search strategy 'annealing'") as caught:
        parse_spec({**base, "search": {"strategy": "annealing"}})
    assert caught.value.errors()[0]["loc"] == ("search", "strategy")


# ---- the KV search -----------------------------------------------------------------------------------------

KV_SPACE = KVSpace(
    groups=(
        KVGroup(layers=(0,), candidates=((8, 8), (4, 4), (2, 2))),
        KVGroup(layers=(1, 2), candidates=((8, 8), (4, 4), (4, 2), (2, 2))),
        KVGroup(layers=(3,), candidates=((8, 8), (8, 4), (4, 4), (2, 2))),
    ),
    num_layers=4,
)


def kv_kl(layers) -> float:
    """Lower bits cost more KL, values less than keys, the first layer most."""
    return sum((3 if i == 0 else 1) * (1 / k + 0.5 / v) for i, (k, v) in enumerate(layers))


def kv_search(record, sampler="nsga2", max_bits=None) -> KVSearch:
    return KVSearch(KV_SPACE, record, sampler=sampler, seed=3, population=4, trials=14, batch=4, max_bits=max_bits)


def new_record() -> optuna.Study:
    return optuna.create_study(directions=["minimize"] * len(OBJECTIVES))


def kv_run(search, record, *, stop_after=None) -> None:
    """The KV job's loop: candidates the record holds are told from it, the others scored; stops after
    `stop_after` tells (between rounds when that is where it falls, like a checkpoint)."""
    told = 0
    while not search.finished and told != stop_after:
        recorded = {t.user_attrs["candidate_id"]: t.values[0] for t in record.get_trials(deepcopy=False)}
        for request in search.ask():
            if told == stop_after:
                return
            kl = recorded.get(request.candidate_id, kv_kl(request.layers))
            search.tell(request.candidate_id, kl, attrs={"effective_bits": 1.0})
            told += 1


def recorded_trials(record) -> list[tuple]:
    return [(t.number, t.user_attrs["candidate_id"], t.params, t.values, t.user_attrs.get("preset"))
            for t in record.get_trials(deepcopy=False)]


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_kv_search_starts_with_the_presets_and_records_every_configuration(sampler):
    record = new_record()
    search = kv_search(record, sampler, max_bits=5.0)
    first = search.ask()
    assert [r.layers for r in first[:3]] == [[[8, 8]] * 4, [[4, 4]] * 4, [[2, 2]] * 4]  # the presets the space kept
    assert len(first) == 4 and search.ask() == [] and record.trials == []  # a round is recorded once it is told
    for request in first:
        search.tell(request.candidate_id, kv_kl(request.layers), attrs={"effective_bits": 1.0})
    kv_run(search, record)
    trials = record.get_trials(deepcopy=False)
    assert search.evaluations == 14 and search.rounds == 4 and len(trials) == 14
    assert [t.user_attrs["candidate_id"] for t in trials] == [f"kv-{t.number}" for t in trials]
    assert all(t.values[1] == KV_SPACE.nominal_bits(_choice(t.user_attrs["layers"])) for t in trials)
    assert [t.user_attrs.get("preset") for t in trials[:4]] == ["KV8", "KV4", "KV2", None]
    assert all(t.values[1] <= 5.0 for t in record.best_trials)  # KV8 (8 bits) is off the front: over the cap
    feasible = [t.values[0] for t in trials if t.values[1] <= 5.0]
    assert search.best_fitness == min(feasible) and kv_kl(search.best) == search.best_fitness


def _choice(layers) -> list[int]:
    return [g.candidates.index(tuple(layers[g.layers[0]])) for g in KV_SPACE.groups]


def test_kv_search_resumed_from_an_older_checkpoint_records_what_the_uninterrupted_one_does():
    full = new_record()
    kv_run(kv_search(full), full)

    record = new_record()
    first = kv_search(record)
    kv_run(first, record, stop_after=4)
    checkpoint = json.loads(json.dumps(first.state_dict()))  # the job saves one after each round
    kv_run(first, record, stop_after=6)  # the driver dies mid-round, two rounds later, before saving again
    resumed = kv_search(record)
    resumed.load_state_dict(checkpoint)
    kv_run(resumed, record)
    assert recorded_trials(record) == recorded_trials(full)  # no trial twice, the same proposals and values
    assert resumed.best_fitness == min(t.values[0] for t in full.trials)


def test_kv_search_refuses_an_unknown_sampler_and_unknown_candidates():
    with pytest.raises(ValueError, match="unknown KV sampler 'cmaes'"):
        kv_search(new_record(), sampler="cmaes")
    search = kv_search(new_record())
    (request, *_) = search.ask()
    search.tell(request.candidate_id, 0.5)
    with pytest.raises(ValueError):
        search.tell(request.candidate_id, 0.5)
    with pytest.raises(ValueError):
        search.tell("kv-99", 0.5)
