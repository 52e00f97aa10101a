"""Training-aware selection: shared stage minibatches, pruned structures exactly zero after training, and the
model put back bit for bit without a deepcopy."""

from __future__ import annotations

import copy

import pytest
import torch

from search.genome import PruneGenome
from workers import database, finetune, levels, slicing


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
    return random_llama, database.LevelSwapper(random_llama, db), db


def test_pruned_columns_stay_exactly_zero_and_the_rest_trains(setup):
    model, swapper, db = setup
    genome = PruneGenome(attn=(1, 0, 2), mlp=(2, 5, 6))
    swapper.apply(genome)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = finetune.stage_batches(_tokens(model.config.vocab_size, 24, seed=3), 256, seed=1, batch_size=4)
    record = finetune.finetune(model, batches, swapper.masks(genome), finetune.TrainSettings(lr=1e-2))
    assert record["steps"] == 4 and not model.training
    for i, layer in enumerate(model.model.layers):
        for kind, weight in (("attn", layer.self_attn.o_proj.weight), ("mlp", layer.mlp.down_proj.weight)):
            level = (genome.attn if kind == "attn" else genome.mlp)[i]
            kept = swapper.keep_mask(i, kind, level).bool()
            assert (weight[:, ~kept] == 0).all()  # exactly zero, not small
            assert not torch.equal(weight[:, kept], before[_key(i, kind)][:, kept]) or not kept.any()
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def _key(i: int, kind: str) -> str:
    return f"model.layers.{i}.self_attn.o_proj.weight" if kind == "attn" else f"model.layers.{i}.mlp.down_proj.weight"


def test_trained_candidate_equals_its_sliced_export(setup):
    model, swapper, db = setup
    genome = PruneGenome(attn=(2, 1, 0), mlp=(1, 3, 6))
    swapper.apply(genome)
    batches = finetune.stage_batches(_tokens(model.config.vocab_size, 24, seed=3), 256, seed=1, batch_size=4)
    finetune.finetune(model, batches, swapper.masks(genome), finetune.TrainSettings(lr=1e-2))
    tokens = _tokens(model.config.vocab_size, 4, seed=9)
    sliced = slicing.slice_model(copy.deepcopy(model), levels.layout(genome, db.orders, db.table))
    with torch.inference_mode():
        assert torch.allclose(sliced(tokens).logits, model(tokens).logits, atol=1e-5)


def test_snapshot_restores_every_weight_bit_for_bit(setup):
    model, swapper, _ = setup
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = finetune.Snapshot([p for p in model.parameters() if p.requires_grad])
    genome = PruneGenome(attn=(1, 1, 1), mlp=(3, 3, 3))
    swapper.apply(genome)
    batches = finetune.stage_batches(_tokens(model.config.vocab_size, 24), 128, seed=2, batch_size=4)
    finetune.finetune(model, batches, swapper.masks(genome), finetune.TrainSettings(lr=1e-2))
    snapshot.restore()
    swapper.forget()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    assert swapper.apply(genome) == 6  # the swapper knows the levels are gone and loads them again


def test_training_lowers_the_loss_on_its_batches(random_llama):
    batch = _tokens(random_llama.config.vocab_size, 4, seed=4)
    record = finetune.finetune(random_llama, [batch] * 10, [], finetune.TrainSettings(lr=1e-2))
    assert record["last_loss"] < record["first_loss"] - 0.1


def test_distillation_starts_at_zero_for_the_dense_model_and_recovers_a_cut_one(setup):
    from workers import metrics

    model, swapper, _ = setup
    batches = finetune.stage_batches(_tokens(model.config.vocab_size, 24, seed=3), 256, seed=1, batch_size=4)
    teacher = [metrics.teacher_logprobs(model, b, batch_size=4) for b in batches]
    snapshot = finetune.Snapshot(list(model.parameters()))
    dense = finetune.finetune(model, batches[:1], [], finetune.TrainSettings(lr=1e-2), teacher[:1])
    assert dense["first_loss"] == pytest.approx(0.0, abs=1e-6)
    snapshot.restore()
    genome = PruneGenome(attn=(1, 1, 1), mlp=(3, 3, 3))
    swapper.apply(genome)
    cut = finetune.finetune(model, batches * 5, swapper.masks(genome), finetune.TrainSettings(lr=3e-3), teacher * 5)
    assert cut["first_loss"] > 0.01 and cut["last_loss"] < 0.5 * cut["first_loss"]
