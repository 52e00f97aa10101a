"""Neural implants in a prune job's evaluator on the micro model: prepared space, scoring, the configuration
document, the export and `configuration.rebuild` all agree on the implanted candidate."""

from __future__ import annotations

import copy

import pytest
import torch

from darwinfront.core.methods import parse_spec
from search.genome import LevelSpace, PruneGenome
from workers import candidate, configuration, slicing

pytestmark = pytest.mark.integration  # prepares a job (database, implants) on the trained micro model

SPEC = {
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "train_tokens": 0, "database_tokens": 512, "eval_tokens": 512,
             "seq_len": 64},
    "prune": {"targets": [0.5], "criterion": "wanda_sp", "training_aware": False, "implants": ["attn", "mlp"]},
    "search": {"generations": 1, "offspring": 2},
    "seed": 1,
}


@pytest.fixture(scope="module")
def evaluator(micro_dir):
    from workers.evaluator import Evaluator
    from workers.prepare import prepare

    torch.set_num_threads(1)
    spec = parse_spec(SPEC).model_dump(mode="json")
    prepared = prepare(spec)
    return Evaluator(spec, prepared), LevelSpace.from_dict(prepared["space"])


def test_the_evaluator_scores_and_exports_an_implanted_candidate(evaluator, tmp_path):
    ev, space = evaluator
    # micro-llama: hidden 64, 2 KV groups of 2 heads (head_dim 16), MLP 128 in 8 steps of 16 channels
    assert space.attn_implant_levels == (1,) and space.mlp_implant_levels == (6, 7)
    genome = PruneGenome(attn=(1, 1), mlp=(7, 1), implants=((0, "mlp"), (1, "attn")))
    plain = PruneGenome(attn=(1, 1), mlp=(7, 1))
    replies = {}
    for g in (genome, plain):
        request = {"candidate_id": g.key(), "genome": g.to_dict(), "target": 0.5, "generation": 0, "stage": 0,
                   "seed": 3, "sequences": 8, "train_tokens": 0, "final": True}
        replies[g] = ev.evaluate(request)
        assert "error" not in replies[g], replies[g]
    assert replies[genome]["params"] == replies[plain]["params"] == space.params(plain)
    assert replies[genome]["kl"] != replies[plain]["kl"]
    document = ev.configuration({"genome": genome.to_dict(), "seed": 3, "train_tokens": 0}, replies[genome])
    assert document["genome"]["implants"] == [[0, "mlp"], [1, "attn"]]
    assert document["layers"][0]["implants"] == {"mlp": 24} and document["layers"][0]["mlp_channels"] == []
    assert document["layers"][1]["implants"] == {"attn": 48} and document["weights"] == "database"
    ev.export(document, str(tmp_path / "export"))
    model, _ = slicing.load_pruned(tmp_path / "export")
    assert slicing.count_parameters(model) == document["parameters"]
    built = candidate.build(ev.inputs.model, ev.database, genome, weights=ev.weights)
    tokens = ev.inputs.held_out[:2]
    with torch.no_grad():
        want = built(tokens).logits
        torch.testing.assert_close(model(tokens).logits, want, atol=1e-5, rtol=0)
        rebuilt = configuration.rebuild(copy.deepcopy(ev.inputs.model), ev.inputs.tokenizer, document)
        torch.testing.assert_close(rebuilt(tokens).logits, want, atol=1e-5, rtol=0)
