"""SeReNe's sensitivity regulariser: the sensitivities and the update against their formulas, the shrinking of
planted insensitive units in training, and the follow-up cut of a sliced model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from darwinfront.core.methods import parse_spec
from search.genome import PruneGenome
from workers import candidate, database, finetune, levels, serene, slicing


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tokens(model, n: int = 4, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_bias"])
def test_sensitivities_are_the_mean_absolute_gradient_of_each_units_output(kind):
    model = tiny_model(kind).double()
    reg = serene.Serene(model, strength=0.1)
    seen = {}

    def keep(key):
        def pre(module, args):
            args[0].retain_grad()
            seen[key] = args[0]
        return pre

    layers = model.model.layers
    handles = [layers[i].self_attn.o_proj.register_forward_pre_hook(keep((i, "attn"))) for i in range(3)]
    handles += [layers[i].mlp.down_proj.register_forward_pre_hook(keep((i, "mlp"))) for i in range(3)]
    tokens = _tokens(model)
    with reg.watch():
        model(input_ids=tokens, labels=tokens).loss.backward()
    for h in handles:
        h.remove()
    got = reg.sensitivities()
    assert set(got) == set(seen)
    for (i, kind_), x in seen.items():
        width = 16 if kind_ == "attn" else 1  # o_proj columns per KV group: 2 query heads of 8
        want = x.grad.abs().reshape(-1, x.shape[-1] // width, width).sum(2).mean(0)
        torch.testing.assert_close(got[(i, kind_)], want, rtol=1e-12, atol=0)
        bar = reg.insensitivities()[(i, kind_)]
        torch.testing.assert_close(bar, torch.relu(1 - want / want.mean()), rtol=1e-12, atol=0)


def test_the_update_is_the_regularisers_gradient_step():
    model = tiny_model("qwen2_bias").double()  # q/k/v biases: row biases move with their units
    reg = serene.Serene(model, strength=0.2, threshold=1.5)
    tokens = _tokens(model)
    with reg.watch():
        model(input_ids=tokens, labels=tokens).loss.backward()
    before = copy.deepcopy(model)
    bars = reg.shrink()
    assert any((bar > 0).any() and (bar == 0).any() for bar in bars.values())  # some units shrink, some do not
    for (i, kind), bar in bars.items():
        _, parts = serene.unit_parts(before.model.layers[i], kind)
        grads = torch.autograd.grad(serene.penalty(before.model.layers[i], kind, bar), [p.tensor for p in parts])
        _, moved = serene.unit_parts(model.model.layers[i], kind)
        for part, new, grad in zip(parts, moved, grads, strict=True):
            torch.testing.assert_close(part.tensor.detach() - new.tensor.detach(), 0.2 * grad, rtol=1e-10,
                                       atol=1e-14)


def _planted(seed: int = 0):
    """A tiny model whose MLP channels 0..7 barely reach the residual stream (down_proj columns x 0.01)."""
    model = tiny_model("llama_gqa", seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :8] *= 0.01
    return model


def _up_norms(model) -> torch.Tensor:
    return torch.stack([layer.mlp.up_proj.weight.detach().norm(dim=1) for layer in model.model.layers])  # (L, I)


def test_training_with_the_regulariser_shrinks_the_planted_insensitive_units():
    batches = [_tokens(tiny_model(), n=4, seed=s) for s in range(12)]
    ratios = {}
    for strength in (0.0, 0.1):
        model = _planted()
        start = _up_norms(model)
        finetune.finetune(model, batches, finetune.TrainSettings(lr=1e-3, serene_strength=strength))
        ratios[strength] = _up_norms(model) / start  # (L, I): how much each channel's up_proj row kept
    planted, others = ratios[0.1][:, :8], ratios[0.1][:, 8:]
    assert planted.max() < 0.5 < ratios[0.0][:, :8].min()  # 0.9^12 = 0.28 of the weights left, vs ~1 without
    assert planted.mean() < 0.6 * others.mean()


def test_the_follow_up_cut_gives_the_model_sliced_to_the_smaller_layout():
    dense = tiny_model("llama_bias")
    first = slicing.Layout(tuple(slicing.LayerLayout(a, m) for a, m in [
        ((0, 1), tuple(range(0, 48, 2))), ((1,), tuple(range(30))), ((0, 1), tuple(range(48)))]))
    model = slicing.slice_model(copy.deepcopy(dense), first)
    drops = {(0, "mlp"): [0, 5, 23], (1, "attn"): [0], (2, "attn"): [1], (2, "mlp"): list(range(48))}
    slicing.cut_further(model, drops)
    want = slicing.Layout(tuple(slicing.LayerLayout(a, m) for a, m in [
        ((0, 1), tuple(c for c in range(0, 48, 2) if c not in (0, 10, 46))), ((), tuple(range(30))), ((0,), ())]))
    assert slicing.Layout.from_dict(model.config.darwinfront_layout) == want
    direct = slicing.slice_model(copy.deepcopy(dense), want)
    tokens = _tokens(dense)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, direct(tokens).logits, atol=1e-6, rtol=0)
    assert slicing.count_parameters(model) == slicing.count_parameters(direct)


def test_cut_shrunk_names_the_units_that_fell_below_the_ratio():
    before = {(0, "mlp"): torch.tensor([1.0, 2.0, 3.0]), (1, "attn"): torch.tensor([1.0, 1.0])}
    after = {(0, "mlp"): torch.tensor([0.4, 1.5, 0.1]), (1, "attn"): torch.tensor([0.9, 0.6])}
    assert serene.cut_shrunk(before, after, 0.5) == {(0, "mlp"): [0, 2]}


def test_training_aware_selection_regularises_the_candidate_and_never_the_dense_model(random_llama, tmp_path):
    spec = parse_spec({"model": {"source": "builtin:micro-llama"},
                       "prune": {"train_serene": {"strength": 0.2, "threshold": 2.0}, "train_lr": 1e-3}})
    settings = finetune.light_training(spec.prune)
    assert (settings.serene_strength, settings.serene_threshold, settings.lr) == (0.2, 2.0, 1e-3)
    assert finetune.light_training(parse_spec({"model": {"source": "builtin:micro-llama"}}).prune).regulariser(
        random_llama) is None
    table = levels.table_for(random_llama, levels=6, multiple=8)
    db = database.build(random_llama, _tokens(random_llama, n=8, t=16), criterion="wanda_sp", table=table,
                        root=tmp_path)
    dense = {k: v.clone() for k, v in random_llama.state_dict().items() if ".layers." in k and "norm" not in k}
    built = candidate.build(random_llama, db, PruneGenome(attn=(1, 0, 0), mlp=(2, 0, 3)), trainable=True)
    start = serene.unit_norms(built)
    finetune.finetune(built, [_tokens(random_llama, seed=s) for s in range(6)], settings)
    assert all(torch.equal(random_llama.state_dict()[k], v) for k, v in dense.items())
    shrunk = serene.unit_norms(built)
    assert min(float((shrunk[k] / start[k]).min()) for k in start) < 0.6  # 0.8^6 = 0.26 for the least sensitive


@pytest.mark.parametrize("bad, loc", [({"strength": 0}, "strength"), ({"threshold": -1}, "threshold"),
                                      ({"cut": 0.5}, "cut")])
def test_the_prune_spec_refuses_bad_serene_options_naming_the_field(bad, loc):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        parse_spec({"model": {"source": "builtin:micro-llama"}, "prune": {"train_serene": bad}})
    assert err.value.errors()[0]["loc"] == ("prune", "train_serene", loc)
