"""HierarchicalPrune's sensitivity-guided distillation: block sensitivities by removal, per-block weights inverse
to them, and the per-block learning rates they set."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from workers import block_distill, fitness


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tokens(model, n: int = 4, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def test_a_blocks_sensitivity_is_the_kl_of_removing_it():
    model = tiny_model("llama_gqa")
    with torch.no_grad():  # block 1 does nothing: both its branches write zeros
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    tokens = _tokens(model)
    s = block_distill.block_sensitivities(model, tokens)
    assert s.shape == (3,) and s[1] == 0 and (s[[0, 2]] > 0).all()
    # block 2 by hand: the model with layer 2's outputs zeroed, against the model
    teacher = fitness.Teacher.of(model, tokens)
    layer = model.model.layers[2]
    saved = layer.self_attn.o_proj.weight.detach().clone(), layer.mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        by_hand = fitness.kl(model, tokens, teacher)
        layer.self_attn.o_proj.weight.copy_(saved[0])
        layer.mlp.down_proj.weight.copy_(saved[1])
    assert abs(float(s[2]) - by_hand) < 1e-6


def test_weights_are_inverse_to_sensitivity_relative_to_the_mean_capped_and_frozen_early_blocks():
    s = torch.tensor([0.5, 1.0, 2.0, 4.5], dtype=torch.float64)  # mean 2
    w = block_distill.block_weights(s, cap=10.0)
    torch.testing.assert_close(w, s.mean() / s, rtol=1e-12, atol=0)
    assert w[2] == 1.0 and w[0] == 4 * w[2]  # the average block at the job's rate; a quarter as sensitive: 4x
    capped = block_distill.block_weights(torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64), cap=3.0)
    torch.testing.assert_close(capped, torch.tensor([3.0, 4 / 3, 4 / 9], dtype=torch.float64))  # nothing: cap
    frozen = block_distill.block_weights(s, cap=10.0, freeze_early=2)
    assert frozen[:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(frozen[2:], torch.tensor([3.25 / 2, 3.25 / 4.5], dtype=torch.float64))


def test_block_learning_rates_follow_the_weights_and_frozen_blocks_do_not_move():
    model = tiny_model("llama_gqa")
    weights = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    optimizer = block_distill.make_optimizer(model, weights, lr=1e-2, weight_decay=0.01)
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs == [0.0, 0.005, 0.01, 0.02]  # the rest (embeddings, final norm) at the job's rate
    before = [p.detach().clone() for p in model.model.layers.parameters()]
    tokens = _tokens(model)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    moved = [not torch.equal(a, b) for a, b in zip(before, model.model.layers.parameters(), strict=True)]
    n0 = len(list(model.model.layers[0].parameters()))
    assert not any(moved[:n0]) and all(moved[n0:])
    up = [n for n, _ in model.model.layers[0].named_parameters()].index("mlp.up_proj.weight")
    steps = [(model.model.layers[i].mlp.up_proj.weight.detach() - before[i * n0 + up]).abs().max() for i in (1, 2)]
    assert 3.5 < steps[1] / steps[0] < 4.5  # Adam's first step is ~lr per weight: 0.02 against 0.005
