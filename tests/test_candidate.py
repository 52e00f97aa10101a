"""Sliced candidates built from a level database: the masked model's KL for random genomes (both attention units,
whole sub-layers removed, mask and obs databases), the same training trajectory as masked training, and the dense
model never written (the evaluator's export of a trained candidate is tested in test_prune_search)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import tiny_model

from search.genome import PruneGenome
from workers import candidate, database, finetune, fitness, levels, metrics, slicing
from workers.criteria._common import target_linear
from workers.levels import KINDS


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tokens(vocab: int, n: int = 8, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)


def _database(model, criterion: str, root, attention_unit: str = "kv_group") -> database.LevelDatabase:
    table = levels.table_for(model, levels=6, multiple=8, attention_unit=attention_unit)
    return database.build(model, _tokens(model.config.vocab_size), criterion=criterion, table=table, root=root)


def _weights(model, db) -> candidate.LevelWeights | None:
    return candidate.LevelWeights(db, model.model.layers[0].self_attn.o_proj.weight) if db.stores_weights else None


def masked_reference(model, db, genome: PruneGenome):
    """The candidate as the evaluator scored it before sliced candidates: a full-size copy of the dense model
    whose o_proj / down_proj hold the level's weights (obs) or the dense weights with removed columns zeroed,
    and the (weight, column mask) pairs that masked training kept zero."""
    masked = copy.deepcopy(model)
    masks = []
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            for kind, level in zip(KINDS, (genome.attn[i], genome.mlp[i]), strict=True):
                if not level:
                    continue
                weight = target_linear(layer, kind).weight
                units = db.table.units(kind)
                keep = torch.ones(units, weight.shape[1] // units)
                keep[list(db.removed(i, kind, level))] = 0
                keep = keep.reshape(1, -1)  # (1, in)
                weight.copy_(db.load_level(i, kind, level)["weight"] if db.stores_weights else weight * keep)
                masks.append((weight, keep))
    return masked, masks


def _random_genomes(table: levels.LevelTable, n_layers: int, count: int, seed: int) -> list[PruneGenome]:
    """Random levels per layer; each genome removes one whole attention and one whole MLP somewhere."""
    rng = random.Random(seed)
    genomes = []
    for _ in range(count):
        attn = [rng.randint(0, table.attn_levels) for _ in range(n_layers)]
        mlp = [rng.randint(0, table.mlp_levels) for _ in range(n_layers)]
        attn[rng.randrange(n_layers)], mlp[rng.randrange(n_layers)] = table.attn_levels, table.mlp_levels
        genomes.append(PruneGenome(attn=tuple(attn), mlp=tuple(mlp)))
    return genomes


@pytest.mark.parametrize("attention_unit", ["kv_group", "q_head"])
@pytest.mark.parametrize("criterion", ["magnitude", "obs"])
def test_sliced_candidates_score_the_masked_kl(surgery_kind, criterion, attention_unit, tmp_path):
    model = tiny_model(surgery_kind)
    db = _database(model, criterion, tmp_path, attention_unit)
    tokens = _tokens(model.config.vocab_size, seed=1)
    teacher = fitness.Teacher.of(model, tokens)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    space = levels.level_space(model, db.table)
    weights = _weights(model, db)
    for genome in _random_genomes(db.table, len(db.orders), count=4, seed=len(surgery_kind)):
        masked, _ = masked_reference(model, db, genome)
        sliced = candidate.build(model, db, genome, weights=weights)
        assert slicing.count_parameters(sliced) == space.params(genome) < space.dense_params
        # (the masks zero what the levels zeroed already; under OLMo 2's whole-projection q/k norms they also
        # keep the norms' statistic to the kept rows, as the sliced model's is)
        with slicing.masked(masked, levels.layout(genome, db.orders, db.table)):
            masked_kl = fitness.kl(masked, tokens, teacher)
            assert fitness.kl(sliced, tokens, teacher) == pytest.approx(masked_kl, abs=1e-5)
            assert masked_kl > 1e-3  # the cut is visible, so equal KLs mean something
            with torch.inference_mode():
                torch.testing.assert_close(sliced(tokens).logits, masked(tokens).logits, atol=1e-5, rtol=0)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # the dense model is only read
    assert not getattr(model.config, "darwinfront_layout", None)


def test_a_candidate_shares_what_is_not_cut_and_owns_its_decoder_linears(random_llama, tmp_path):
    db = _database(random_llama, "obs", tmp_path)
    genome = PruneGenome(attn=(1, 0, 2), mlp=(0, 5, 6))
    shared = {id(p) for p in candidate.shared_parameters(random_llama)}
    dense = {id(p) for p in random_llama.parameters()}
    for trainable in (False, True):
        built = candidate.build(random_llama, db, genome, weights=_weights(random_llama, db), trainable=trainable)
        assert built.model.embed_tokens is random_llama.model.embed_tokens and built.lm_head is random_llama.lm_head
        assert built.model.layers[0].input_layernorm is random_llama.model.layers[0].input_layernorm
        reused = {id(p) for p in built.parameters()} & dense
        whole = {id(p) for p in random_llama.model.layers[1].self_attn.parameters()}  # layer 1 keeps its attention
        whole |= {id(p) for p in random_llama.model.layers[0].mlp.parameters()}  # layer 0 keeps its MLP
        assert reused == (shared if trainable else shared | whole)


def test_level_weights_are_the_stored_ones_and_the_cache_stays_small(random_llama, tmp_path):
    db = _database(random_llama, "obs", tmp_path)
    weights = candidate.LevelWeights(db, random_llama.model.layers[0].self_attn.o_proj.weight, cache_bytes=1)
    assert torch.equal(weights(1, "attn", 1)["weight"], db.load_level(1, "attn", 1)["weight"])
    assert torch.equal(weights(2, "mlp", 3)["weight"], db.load_level(2, "mlp", 3)["weight"])
    assert list(weights._cache) == [(2, "mlp", 3)]  # one level in memory
    genome = PruneGenome(attn=(1, 0, 0), mlp=(0, 0, 0))
    dense = random_llama.model.layers[0].self_attn.o_proj.weight
    one_shot = candidate.build(random_llama, db, genome, weights=weights).model.layers[0].self_attn.o_proj.weight
    cut = candidate.build(random_llama, db, genome).model.layers[0].self_attn.o_proj.weight
    assert torch.equal(cut, dense[:, _kept_columns(db, 0, dense.shape[1])])  # no weights: the dense columns, as cut
    assert not torch.allclose(one_shot, cut)


def _kept_columns(db, layer: int, o_proj_width: int) -> list[int]:
    """o_proj input columns of the attention units that level 1 of `layer` keeps."""
    width = o_proj_width // db.table.attn_units
    gone = set(db.removed(layer, "attn", 1))
    return [u * width + c for u in range(db.table.attn_units) if u not in gone for c in range(width)]


def _masked_finetune(model, batches, masks, settings, teacher=None) -> list[float]:
    """The evaluator's training before sliced candidates: masked gradients, weights masked again after each step."""
    optimizer = finetune.make_optimizer(model, settings)
    losses = []
    model.train()
    for step, batch in enumerate(batches):
        if teacher is None:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            student = torch.log_softmax(model(input_ids=batch).logits[:, :-1], dim=-1)  # (B, T-1, vocab)
            loss = torch.nn.functional.kl_div(student, teacher[step], log_target=True, reduction="sum")
            loss = loss / teacher[step].shape[:2].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for weight, mask in masks:
            weight.grad.mul_(mask)
        optimizer.step()
        with torch.no_grad():
            for weight, mask in masks:
                assert (weight * (1 - mask) == 0).all()  # zero weight, zero grad: AdamW leaves it zero by itself
                weight.mul_(mask)
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize(("attention_unit", "loss"), [("kv_group", "ce"), ("q_head", "kd"), ("kv_group", "kd")])
def test_training_the_sliced_candidate_follows_the_masked_trajectory(attention_unit, loss, tmp_path):
    model = tiny_model("llama_bias")
    db = _database(model, "obs", tmp_path, attention_unit)
    genome = PruneGenome(attn=(1, db.table.attn_levels, 2), mlp=(db.table.mlp_levels, 3, 1))
    batches = finetune.stage_batches(_tokens(model.config.vocab_size, 24, seed=3), 256, seed=1, batch_size=4)
    teacher = [metrics.teacher_logprobs(model, b, batch_size=4) for b in batches] if loss == "kd" else None
    settings = finetune.TrainSettings(lr=3e-3)
    masked, masks = masked_reference(model, db, genome)
    tokens = _tokens(model.config.vocab_size, 4, seed=9)
    with torch.inference_mode():
        untrained = masked(tokens).logits
    expected = _masked_finetune(masked, batches, masks, settings, teacher)

    dense = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = finetune.Snapshot(candidate.shared_parameters(model))
    sliced = candidate.build(model, db, genome, weights=_weights(model, db), trainable=True)
    record = finetune.finetune(sliced, batches, settings, teacher)
    assert record["steps"] == len(expected) == 4
    assert record["first_loss"] == pytest.approx(expected[0], rel=1e-5)
    assert record["last_loss"] == pytest.approx(expected[-1], rel=1e-5)
    with torch.inference_mode():
        trained = masked(tokens).logits
        torch.testing.assert_close(sliced(tokens).logits, trained, atol=1e-5, rtol=1e-5)
    assert (trained - untrained).abs().max() > 1e-2  # the training moved the logits far beyond the tolerance
    assert not torch.equal(model.model.embed_tokens.weight, dense["model.embed_tokens.weight"])  # shared, trained
    snapshot.restore()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # put back bit for bit

