"""NIRVANA's KL calibration selection (`data.selection: kl`) on the trained micro-llama: the draws, the rule,
and a job's pools built with it, reproducibly."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from darwinfront.core.methods import parse_spec
from darwinfront.core.spec import DataSpec
from workers import calibration_select, criteria, levels
from workers.job_inputs import token_pools

DATA = {"calibration_tokens": 512, "train_tokens": 0, "database_tokens": 256, "eval_tokens": 128, "seq_len": 64}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_draws_are_seeded_distinct_rows():
    first = calibration_select.draws(20, count=5, size=6, seed=3)
    assert first == calibration_select.draws(20, count=5, size=6, seed=3)
    assert first != calibration_select.draws(20, count=5, size=6, seed=4)
    assert all(rows == sorted(set(rows)) and len(rows) == 6 and rows[0] >= 0 and rows[-1] < 20 for rows in first)
    assert len({tuple(rows) for rows in first}) == 5
    with pytest.raises(ValueError, match="does not fit"):
        calibration_select.draws(4, count=2, size=5, seed=0)


def test_the_spec_checks_the_selection_pool():
    assert DataSpec(**DATA).selection == "first"
    assert DataSpec(**DATA, selection="kl").selection_pool == 4 * 256 // 64
    with pytest.raises(ValidationError, match="selection_pool_tokens"):
        DataSpec(**DATA, selection="kl", selection_pool_tokens=128)
    with pytest.raises(ValidationError):
        DataSpec(**DATA, selection="entropy")


def test_the_rule_keeps_the_draw_whose_cut_is_closest_to_the_dense_model(micro_model):
    model, tokenizer = micro_model
    pools = token_pools(tokenizer, DataSpec(**DATA), 3)
    real = pools["calibration"][:4]
    constant = torch.full_like(real, int(real[0, 5]))  # one token repeated: activations that say little
    noise = torch.randint(0, model.config.vocab_size, real.shape, generator=torch.Generator().manual_seed(0))
    table = levels.table_for(model, 4, 8)
    kls = calibration_select.kl_of_draws(model, [constant, noise, real], pools["calibration"],
                                         criterion=criteria.get("wanda_sp"), table=table, sparsity=0.5)
    assert min(range(3), key=kls.__getitem__) == 2 and kls[2] < kls[1] < kls[0]  # planted: text beats both

    pool = torch.cat([real, constant, noise, pools["calibration"][4:]])  # (16, T)
    record = calibration_select.select(model, pool, pools["calibration"], count=4, size=4, seed=1,
                                       criterion=criteria.get("wanda_sp"), table=table, sparsity=0.5)
    assert record["chosen"] == min(range(4), key=lambda k: (record["kls"][k], k))
    assert record["rows"] == calibration_select.draws(16, count=4, size=4, seed=1)[record["chosen"]]
    again = calibration_select.select(model, pool, pools["calibration"], count=4, size=4, seed=1,
                                      criterion=criteria.get("wanda_sp"), table=table, sparsity=0.5)
    assert again == record


def test_a_job_with_kl_selection_builds_its_database_on_the_chosen_draw(micro_dir, tmp_path, monkeypatch):
    from workers.evaluator import Evaluator
    from workers.job_inputs import JobInputs
    from workers.prepare import prepare

    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path))
    spec = parse_spec({"model": {"source": str(micro_dir), "device": "cpu"},
                       "data": {**DATA, "selection": "kl", "selection_candidates": 3},
                       "prune": {"criterion": "wanda_sp", "levels": 4, "training_aware": False}, "seed": 2})
    spec_dict = spec.model_dump(mode="json")
    prepared = prepare(spec_dict)
    record = prepared["data_selection"]
    assert len(record["kls"]) == 3 and len(record["rows"]) == 4
    inputs = JobInputs.load(spec)  # computed afresh: the same choice
    assert inputs.selection == record
    pool = token_pools(inputs.tokenizer, spec.data, spec.seed)["selection_pool"]
    assert torch.equal(inputs.database, pool[torch.tensor(record["rows"])])
    evaluator = Evaluator(spec_dict, prepared)  # takes the prepare step's record, opens the same database
    assert evaluator.database.key == prepared["database"]["key"] and torch.equal(evaluator.inputs.database,
                                                                                 inputs.database)
    first = parse_spec({**spec_dict, "data": {**spec_dict["data"], "selection": "first"}})
    assert not torch.equal(JobInputs.load(first).database, inputs.database) or record["rows"] == list(range(4))


@pytest.mark.integration  # OBS levels of 3 draws: about a minute on a busy CPU
def test_a_configuration_rebuilds_the_database_on_the_chosen_rows(micro_dir, tmp_path, monkeypatch):
    from search.genome import PruneGenome
    from workers import modeling
    from workers.configuration import rebuild
    from workers.evaluator import Evaluator
    from workers.prepare import prepare

    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path))
    spec = parse_spec({"model": {"source": str(micro_dir), "device": "cpu"},
                       "data": {**DATA, "selection": "kl", "selection_candidates": 2},
                       "prune": {"criterion": "obs", "levels": 4, "training_aware": False}, "seed": 4})
    spec_dict = spec.model_dump(mode="json")
    prepared = prepare(spec_dict)
    evaluator = Evaluator(spec_dict, prepared)
    genome = PruneGenome(attn=(1, 0), mlp=(2, 3))
    request = {"candidate_id": "c", "genome": genome.to_dict(), "target": 0.5, "generation": 1, "stage": 0,
               "seed": 4, "sequences": 100, "train_tokens": 0, "final": True}
    reply = evaluator.evaluate(request)
    configuration = evaluator.configuration(request, {"candidate_id": "c", "target": 0.5, "kl": reply["kl"]})
    assert configuration["database"]["selection_rows"] == prepared["data_selection"]["rows"]
    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path / "elsewhere"))  # no cached database: rebuilt
    model, tokenizer = modeling.load_model(str(micro_dir), device="cpu")
    rebuild(model, tokenizer, configuration)  # raises unless it rebuilds the very database the job used
