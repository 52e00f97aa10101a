"""FLAP's bias compensation as a job option: a removed constant channel costs nothing, a cut's KL drops, and
the configuration and the saved model reproduce the compensated candidate."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError

from darwinfront.core.methods import parse_spec
from search.genome import PruneGenome
from workers import candidate, database, fitness, modeling, slicing
from workers.configuration import rebuild
from workers.job_inputs import token_pools
from workers.levels import LevelTable

BASE = {"model": {"source": "builtin:micro-llama", "device": "cpu"}}
SPEC = {
    "data": {"calibration_tokens": 512, "train_tokens": 512, "database_tokens": 1024, "eval_tokens": 256,
             "seq_len": 64},
    "prune": {"targets": [0.5], "criterion": "flap", "bias_compensation": True, "levels": 4,
              "training_aware": False},
    "seed": 2,
}


def test_the_spec_takes_bias_compensation_only_from_a_criterion_that_has_it():
    assert parse_spec({**BASE, "prune": {"criterion": "flap", "bias_compensation": True}})
    assert not parse_spec({**BASE, "prune": {"criterion": "flap"}}).prune.bias_compensation
    with pytest.raises(ValidationError) as info:
        parse_spec({**BASE, "prune": {"criterion": "wanda_sp", "bias_compensation": True}})
    (error,) = info.value.errors()
    assert error["loc"] == ("prune", "bias_compensation")
    assert "'wanda_sp' has no bias compensation; criteria that have one: flap" in error["msg"]


def _tokens(n: int = 6, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(3))


def test_a_removed_constant_channel_is_compensated_exactly(tmp_path):
    model = tiny_model("llama_bias")
    mlp = model.model.layers[1].mlp
    with torch.no_grad():  # channel 5 of layer 1 sees silu(b_gate)·b_up whatever the input: a constant
        mlp.gate_proj.weight[5] = 0
        mlp.up_proj.weight[5] = 0
    table = LevelTable(attn_units=2, attn_step=1, mlp_units=48, mlp_step=1)
    calibration, tokens = _tokens(), _tokens(3, 12) + 0
    db = database.build(model, calibration, criterion="flap", table=table, options={"bias_compensation": True},
                        root=tmp_path)
    assert db.stores_weights and db.orders[1]["mlp"][0] == 5  # no fluctuation: removed first
    genome = PruneGenome(attn=(0, 0, 0), mlp=(0, 1, 0))
    weights = candidate.LevelWeights(db, mlp.down_proj.weight)
    with torch.no_grad():
        dense = model(input_ids=tokens).logits
        compensated = candidate.build(model, db, genome, weights=weights)(input_ids=tokens).logits
        cut = candidate.build(model, db, genome)(input_ids=tokens).logits
    torch.testing.assert_close(compensated, dense, rtol=0, atol=1e-5)
    assert (cut - dense).abs().max() > 1e-3
    masks = database.build(model, calibration, criterion="flap", table=table, root=tmp_path)
    assert not masks.stores_weights and masks.key != db.key and masks.orders[1]["mlp"][0] == 5


@pytest.fixture(scope="module")
def compensated(micro_dir, tmp_path_factory):
    """A compensated flap candidate of micro-llama scored as cut, its evaluator and its configuration."""
    from workers.evaluator import Evaluator
    from workers.prepare import prepare

    mp = pytest.MonkeyPatch()
    mp.setenv("DARWINFRONT_DATABASE_DIR", str(tmp_path_factory.mktemp("databases")))
    spec = parse_spec({**SPEC, "model": {"source": str(micro_dir), "device": "cpu"}})
    spec_dict = spec.model_dump(mode="json")
    evaluator = Evaluator(spec_dict, prepare(spec_dict))
    genome = PruneGenome(attn=(0, 0), mlp=(2, 2))  # half of every MLP (compensation does not help every cut: a
    # KV group of micro-llama's first layer, whose output every later layer reads, scores worse with it)
    request = {"candidate_id": "c", "genome": genome.to_dict(), "target": 0.5, "generation": 1, "stage": 0,
               "seed": 4, "sequences": 10_000, "train_tokens": 0, "final": False}
    reply = evaluator.evaluate(request)
    assert "error" not in reply
    configuration = evaluator.configuration(request, {"candidate_id": "c", "target": 0.5, "kl": reply["kl"]})
    yield spec, evaluator, reply, configuration
    mp.undo()


def test_compensation_lowers_the_kl_of_the_cut(compensated):
    _, _, reply, configuration = compensated
    metrics = configuration["metrics"]
    assert configuration["weights"] == "database"
    assert configuration["database"]["options"] == {"bias_compensation": True}
    assert metrics["kl_oneshot"] == pytest.approx(reply["kl"], abs=1e-6)
    assert metrics["kl_oneshot"] < 0.5 * metrics["kl_cut"]  # 0.0015 against 0.0052


def test_rebuild_and_the_saved_model_reproduce_the_compensated_candidate(compensated, micro_dir, tmp_path):
    spec, evaluator, reply, configuration = compensated
    dense, tokenizer = modeling.load_model(str(micro_dir), device="cpu")
    teacher_tokens = token_pools(tokenizer, spec.data, spec.seed)["calibration"]
    teacher = fitness.Teacher.of(dense, teacher_tokens)
    model, _ = modeling.load_model(str(micro_dir), device="cpu")
    rebuild(model, tokenizer, configuration)
    assert fitness.kl(model, teacher_tokens, teacher) == pytest.approx(reply["kl"], abs=1e-5)
    assert slicing.count_parameters(model) == configuration["parameters"]  # a shift is not a parameter
    slicing.save_pruned(model, tokenizer, tmp_path / "saved")
    reloaded, _ = slicing.load_pruned(tmp_path / "saved")
    assert fitness.kl(reloaded, teacher_tokens, teacher) == pytest.approx(reply["kl"], abs=1e-5)
