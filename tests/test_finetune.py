"""Training-aware selection: shared stage minibatches, a sliced candidate that trains, and the dense weights it
shares put back bit for bit without a deepcopy (masked-training equivalence is in test_candidate)."""

from __future__ import annotations

import pytest
import torch

from search.genome import PruneGenome
from workers import candidate, database, finetune, levels


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tokens(vocab: int, n: int, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)


def test_stage_batches_are_shared_by_seed_and_sized_by_tokens():
    pool = torch.arange(40 * 16).view(40, 16)
    first = finetune.stage_batches(pool, tokens=200, seed=5, batch_size=4)
    again = finetune.stage_batches(pool, tokens=200, seed=5, batch_size=4)
    other = finetune.stage_batches(pool, tokens=200, seed=6, batch_size=4)
    assert [b.shape for b in first] == [(4, 16)] * 3 + [(1, 16)]  # ceil(200 / 16) = 13 sequences
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    rows = torch.cat(first)[:, 0] // 16
    assert len(set(rows.tolist())) == 13  # without replacement
    everything = torch.cat(finetune.stage_batches(pool, tokens=10_000, seed=1, batch_size=8))
    assert sorted(everything[:, 0].tolist()) == pool[:, 0].tolist()  # capped by the pool, each once
    assert finetune.stage_batches(pool, tokens=0, seed=1, batch_size=8) == []


@pytest.fixture
def setup(random_llama, tmp_path):
    calibration = _tokens(random_llama.config.vocab_size, 8)
    table = levels.table_for(random_llama, levels=6, multiple=8)
    db = database.build(random_llama, calibration, criterion="obs", table=table, root=tmp_path)
    weights = candidate.LevelWeights(db, random_llama.model.layers[0].self_attn.o_proj.weight)
    return random_llama, db, weights


_NORMS = ("input_layernorm", "post_attention_layernorm")


def test_a_candidate_trains_its_kept_weights_and_the_shared_ones(setup):
    model, db, weights = setup
    genome = PruneGenome(attn=(1, 0, 2), mlp=(2, 5, 6))
    built = candidate.build(model, db, genome, weights=weights, trainable=True)
    before = {k: v.clone() for k, v in built.state_dict().items()}
    batches = finetune.stage_batches(_tokens(model.config.vocab_size, 24, seed=3), 256, seed=1, batch_size=4)
    record = finetune.finetune(built, batches, finetune.TrainSettings(lr=1e-2))
    assert record["steps"] == 4 and not built.training and not model.training
    after = built.state_dict()
    unchanged = {k for k, v in before.items() if torch.equal(after[k], v)}
    # layer 2 keeps nothing, so nothing reads its norms: no gradient, no step (masked training decayed them)
    assert set(after) == set(before) and unchanged == {f"model.layers.2.{n}.weight" for n in _NORMS}
    assert all(p.grad is None for p in model.parameters())  # gradients dropped after training


def test_snapshot_restores_every_dense_weight_bit_for_bit(setup):
    model, db, weights = setup
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = finetune.Snapshot([p for p in candidate.shared_parameters(model) if p.requires_grad])
    genome = PruneGenome(attn=(1, 0, 1), mlp=(0, 3, 3))  # layer 1 keeps its attention, layer 0 its MLP
    built = candidate.build(model, db, genome, weights=weights, trainable=True)
    batches = finetune.stage_batches(_tokens(model.config.vocab_size, 24), 128, seed=2, batch_size=4)
    finetune.finetune(built, batches, finetune.TrainSettings(lr=1e-2))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, dense[k])]
    assert changed and all("self_attn" not in k and "mlp" not in k for k in changed)  # only shared ones trained
    snapshot.restore()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_training_lowers_the_loss_on_its_batches(random_llama):
    batch = _tokens(random_llama.config.vocab_size, 4, seed=4)
    record = finetune.finetune(random_llama, [batch] * 10, finetune.TrainSettings(lr=1e-2))
    assert record["last_loss"] < record["first_loss"] - 0.1


def test_distillation_starts_at_zero_for_the_dense_model_and_recovers_a_cut_one(setup):
    from workers import metrics

    model, db, weights = setup
    batches = finetune.stage_batches(_tokens(model.config.vocab_size, 24, seed=3), 256, seed=1, batch_size=4)
    teacher = [metrics.teacher_logprobs(model, b, batch_size=4) for b in batches]
    snapshot = finetune.Snapshot(list(model.parameters()))
    dense = finetune.finetune(model, batches[:1], finetune.TrainSettings(lr=1e-2), teacher[:1])
    assert dense["first_loss"] == pytest.approx(0.0, abs=1e-6)
    snapshot.restore()
    built = candidate.build(model, db, PruneGenome(attn=(1, 1, 1), mlp=(3, 3, 3)), weights=weights, trainable=True)
    cut = finetune.finetune(built, batches * 5, finetune.TrainSettings(lr=3e-3), teacher * 5)
    assert cut["first_loss"] > 0.01 and cut["last_loss"] < 0.5 * cut["first_loss"]
