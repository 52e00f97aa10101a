"""Known-answer tests for the gradient criteria: Taylor and gates (autograd first order, Fisher, SPSA)."""

from __future__ import annotations

import math

import pytest
import torch
from test_criteria_support import calibration, group_rows, permute_groups, tiny_model

from workers import criteria
from workers.criteria.gate import gate_gradients, rademacher, spsa_gradient
from workers.criteria.taylor import weight_gradients

GRADIENT_CRITERIA = ["taylor", "gate", "gate_fisher"]


def test_gate_gradient_equals_the_weight_gradient_sums():
    model, calib = tiny_model(), calibration(n=6)
    first, _ = gate_gradients(model, calib)
    wg = weight_gradients(model, calib)
    for layer, g, w in zip(model.model.layers, first, wg, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        o = (attn.o_proj.weight * w["attn"]["o"]).sum(0).reshape(2, 32).sum(1)
        v = (attn.v_proj.weight * w["attn"]["v"]).sum(1).reshape(2, 16).sum(1)
        down = (mlp.down_proj.weight * w["mlp"]["down"]).sum(0)
        up = (mlp.up_proj.weight * w["mlp"]["up"]).sum(1)
        for identity in (o, v):
            torch.testing.assert_close(g["attn"], identity.detach(), rtol=1e-9, atol=1e-12)
        for identity in (down, up):
            torch.testing.assert_close(g["mlp"], identity.detach(), rtol=1e-9, atol=1e-12)
        assert g["attn"].abs().min() > 1e-6  # the identity is not 0 == 0


def test_basis_probes_are_central_finite_differences_of_the_gate_gradient():
    model, calib = tiny_model(), calibration(n=4, t=16)
    first, _ = gate_gradients(model, calib)
    fd_attn = spsa_gradient(model, calib, 0, "attn", torch.eye(2), eps=1e-4) * 2
    torch.testing.assert_close(fd_attn, first[0]["attn"], rtol=1e-6, atol=0)
    fd_mlp = spsa_gradient(model, calib, 1, "mlp", torch.eye(128)[:6], eps=1e-4)[:6] * 6
    torch.testing.assert_close(fd_mlp, first[1]["mlp"][:6], rtol=1e-6, atol=1e-12)


def test_spsa_cosine_meets_the_sqrt_bound_and_rises_with_probes():
    model, calib = tiny_model(num_key_value_heads=4), calibration(n=4, t=16)  # d = 4 head gates
    true = gate_gradients(model, calib, kinds=("attn",))[0][0]["attn"]
    cos = {}
    for k in (64, 256):
        est = spsa_gradient(model, calib, 0, "attn", rademacher(k, 4, seed=11))
        cos[k] = torch.nn.functional.cosine_similarity(est, true, dim=0).item()
        assert cos[k] >= math.sqrt(k / (k + 4 + 1)) - 0.05, (k, cos[k])
    assert cos[256] > cos[64]


def test_fisher_is_the_mean_of_squared_per_sequence_gradients():
    model, calib = tiny_model(), calibration(n=5)
    _, fisher = gate_gradients(model, calib, batch_size=2)
    per_seq = [gate_gradients(model, calib[i : i + 1])[0] for i in range(5)]
    for layer in range(2):
        for kind in ("attn", "mlp"):
            expected = torch.stack([g[layer][kind] ** 2 for g in per_seq]).mean(0)
            torch.testing.assert_close(fisher[layer][kind], expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", GRADIENT_CRITERIA)
def test_dead_units_score_exactly_zero(name):
    model = tiny_model()
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    with torch.no_grad():
        a0.o_proj.weight[:, group_rows(model, 1, "q")] = 0  # dead via o
        a1.v_proj.weight[group_rows(model, 0, "kv")] = 0  # dead via v
        model.model.layers[0].mlp.up_proj.weight[9] = 0
        model.model.layers[1].mlp.down_proj.weight[:, 99] = 0
    s = criteria.get(name).score(model, calibration(n=6))
    assert s.layers[0].attn[1].item() == 0.0 and s.layers[0].attn[0] > 0
    assert s.layers[1].attn[0].item() == 0.0 and s.layers[1].attn[1] > 0
    assert s.layers[0].mlp[9].item() == 0.0 and s.layers[1].mlp[99].item() == 0.0
    assert (s.layers[0].mlp > 0).sum() == 127 and (s.layers[1].mlp > 0).sum() == 127


@pytest.mark.parametrize("name", GRADIENT_CRITERIA)
def test_gradient_scores_are_invariant_to_micro_batching(name):
    model, calib = tiny_model(), calibration(n=6)
    a = criteria.get(name, batch_size=6).score(model, calib)
    b = criteria.get(name, batch_size=4).score(model, calib)
    for x, y in zip(a.layers, b.layers, strict=True):
        torch.testing.assert_close(x.attn, y.attn, rtol=1e-9, atol=0)
        torch.testing.assert_close(x.mlp, y.mlp, rtol=1e-9, atol=1e-18)


@pytest.mark.parametrize("name", GRADIENT_CRITERIA)
def test_gradient_scores_survive_rescaling_and_follow_permutations(name):
    model, calib = tiny_model(layers=1, num_key_value_heads=4), calibration(n=6)
    before = criteria.get(name).score(model, calib).layers[0]
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # X -> 3X through v, W_o -> W_o / 3 for group 2: the same function
        attn.v_proj.weight[group_rows(model, 2, "kv")] *= 3.0
        attn.o_proj.weight[:, group_rows(model, 2, "q")] /= 3.0
    rescaled = criteria.get(name).score(model, calib).layers[0]
    torch.testing.assert_close(rescaled.attn, before.attn, rtol=1e-9, atol=0)
    perm = [3, 2, 0, 1]
    permute_groups(model, 0, perm)
    permuted = criteria.get(name).score(model, calib).layers[0]
    torch.testing.assert_close(permuted.attn, rescaled.attn[perm], rtol=1e-9, atol=0)
    torch.testing.assert_close(permuted.mlp, rescaled.mlp, rtol=1e-9, atol=1e-18)


def test_weight_gradients_leave_the_model_as_found():
    model = tiny_model()
    model.lm_head.weight.requires_grad_(False)
    marker = torch.full_like(model.model.layers[0].mlp.up_proj.weight, 7.0)
    model.model.layers[0].mlp.up_proj.weight.grad = marker
    weight_gradients(model, calibration(n=2))
    criteria.get("gate").score(model, calibration(n=2))
    assert model.model.layers[0].mlp.up_proj.weight.grad is marker
    assert model.model.layers[1].self_attn.q_proj.weight.grad is None
    assert not model.lm_head.weight.requires_grad and model.model.layers[1].mlp.up_proj.weight.requires_grad


def test_gate_spsa_criterion_is_seeded_and_ranks_like_autograd_on_heads():
    model, calib = tiny_model(layers=1, num_key_value_heads=4), calibration(n=4, t=16)
    spsa = criteria.get("gate_spsa", probes=128, seed=2)
    a = spsa.score(model, calib, kinds=("attn",))
    b = criteria.get("gate_spsa", probes=128, seed=2).score(model, calib, kinds=("attn",))
    assert torch.equal(a.layers[0].attn, b.layers[0].attn) and a.layers[0].mlp.numel() == 0
    exact = criteria.get("gate").score(model, calib, kinds=("attn",))
    for est, ref in zip(a.layers, exact.layers, strict=True):
        assert torch.nn.functional.cosine_similarity(est.attn, ref.attn, dim=0) > 0.9
    with pytest.raises(ValueError, match="Fisher"):
        criteria.get("gate", stat="fisher", estimator="spsa")


def test_spsa_refuses_a_step_lost_in_bf16_rounding():
    model = tiny_model(layers=1).to(torch.bfloat16)
    with pytest.raises(ValueError, match="eps=0.001"):
        spsa_gradient(model, calibration(n=2, t=8), 0, "attn", rademacher(4, 2, seed=0), eps=1e-3)
