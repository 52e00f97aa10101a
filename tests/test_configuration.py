"""A downloaded configuration applied to the original model gives the front's one-shot model (obs included)."""

from __future__ import annotations

import pytest

from darwinfront.core.methods import parse_spec
from search.genome import PruneGenome
from workers import fitness, modeling
from workers.configuration import rebuild
from workers.job_inputs import token_pools

SPEC = {
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "train_tokens": 512, "database_tokens": 1024, "eval_tokens": 256,
             "seq_len": 64},
    "prune": {"targets": [0.5], "criterion": "obs", "levels": 4, "training_aware": False},
    "seed": 2,
}


@pytest.fixture(scope="module")
def scored(micro_dir, tmp_path_factory):
    """An obs candidate scored by the evaluator as cut (one shot), and its configuration document."""
    from workers.evaluator import Evaluator
    from workers.prepare import prepare

    mp = pytest.MonkeyPatch()
    mp.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    spec = parse_spec({**SPEC, "model": {"source": str(micro_dir), "device": "cpu"}})
    spec_dict = spec.model_dump(mode="json")
    prepared = prepare(spec_dict)
    evaluator = Evaluator(spec_dict, prepared)
    genome = PruneGenome(attn=(1, 0), mlp=(2, 3))
    request = {"candidate_id": "c", "genome": genome.to_dict(), "target": 0.5, "generation": 1, "stage": 0,
               "seed": 4, "sequences": 10_000, "train_tokens": 0, "final": False}
    reply = evaluator.evaluate(request)
    assert "error" not in reply
    configuration = evaluator.configuration(request, {"candidate_id": "c", "target": 0.5, "kl": reply["kl"]})
    yield spec, reply, configuration
    mp.undo()


def _kl(model, tokenizer, spec, dense):
    pools = token_pools(tokenizer, spec.data, spec.seed)
    return fitness.kl(model, pools["calibration"], fitness.Teacher.of(dense, pools["calibration"]))


def test_the_configuration_rebuilds_the_one_shot_model_the_front_scored(scored, micro_dir):
    spec, reply, configuration = scored
    assert configuration["weights"] == "database" and configuration["database"]["criterion"] == "obs"
    metrics = configuration["metrics"]  # side by side: the structure alone, the one-shot model (= the front's kl)
    assert metrics["kl_oneshot"] == pytest.approx(reply["kl"], abs=1e-6) and metrics["kl_cut"] > metrics["kl_oneshot"]
    assert configuration["gives"] == {"rebuild": "kl_oneshot", "apply_configuration": "kl_cut", "archive": "kl_oneshot"}
    dense, tokenizer = modeling.load_model(str(micro_dir), device="cpu")
    model, _ = modeling.load_model(str(micro_dir), device="cpu")
    rebuild(model, tokenizer, configuration)  # the database is found in the cache the job built
    assert _kl(model, tokenizer, spec, dense) == pytest.approx(reply["kl"], abs=1e-4)


def test_rebuilding_elsewhere_builds_the_same_database_from_the_named_data(scored, micro_dir, tmp_path, monkeypatch):
    spec, reply, configuration = scored
    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path))  # another machine: an empty cache
    dense, tokenizer = modeling.load_model(str(micro_dir), device="cpu")
    model, _ = modeling.load_model(str(micro_dir), device="cpu")
    rebuild(model, tokenizer, configuration)
    assert _kl(model, tokenizer, spec, dense) == pytest.approx(reply["kl"], abs=1e-4)
    assert list(tmp_path.glob("databases/obs-*/index.json"))


def test_the_structure_alone_is_a_different_worse_model(scored, micro_dir):
    from workers import slicing

    spec, reply, configuration = scored
    dense, tokenizer = modeling.load_model(str(micro_dir), device="cpu")
    model, _ = modeling.load_model(str(micro_dir), device="cpu")
    slicing.apply_configuration(model, configuration)  # dense weights, no OBS updates
    assert _kl(model, tokenizer, spec, dense) == pytest.approx(configuration["metrics"]["kl_cut"], abs=1e-4)
    assert configuration["metrics"]["kl_cut"] > reply["kl"] * 1.05


def test_another_model_is_refused_by_its_fingerprint(scored):
    from conftest import tiny_model

    from darwinfront.core.errors import InvalidSpec

    _, _, configuration = scored
    with pytest.raises(InvalidSpec, match="fingerprint"):
        rebuild(tiny_model(), None, configuration)
