"""Known-answer tests for the registry and the forward-statistic criteria: random, magnitude, wanda_sp."""

from __future__ import annotations

import pytest
import torch
from test_criteria_support import calibration, group_rows, permute_groups, tiny_model

from workers import criteria


def test_registry_builds_criteria_by_name():
    assert {"random", "magnitude", "wanda_sp"} <= set(criteria.names())
    assert criteria.get("random", seed=7).seed == 7
    assert criteria.get("wanda_sp", batch_size=3).batch_size == 3
    with pytest.raises(ValueError, match="nope"):
        criteria.get("nope")


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="heads"):
        criteria.get("magnitude").score(tiny_model(), calibration(), kinds=("heads",))


def test_random_is_seeded_uniform_and_shaped():
    model = tiny_model()
    a = criteria.get("random", seed=3).score(model, calibration())
    b = criteria.get("random", seed=3).score(tiny_model(seed=5), calibration(seed=9))
    c = criteria.get("random", seed=4).score(model, calibration())
    assert len(a) == 2 and a.layers[0].attn.shape == (2,) and a.layers[0].mlp.shape == (128,)
    assert all(
        torch.equal(x.mlp, y.mlp) and torch.equal(x.attn, y.attn)
        for x, y in zip(a.layers, b.layers, strict=False)
    )
    assert not torch.equal(a.layers[0].mlp, c.layers[0].mlp)
    assert a.layers[1].mlp.min() >= 0.0 and a.layers[1].mlp.max() < 1.0
    only_attn = criteria.get("random", seed=3).score(model, calibration(), kinds=("attn",))
    assert torch.equal(only_attn.layers[1].attn, a.layers[1].attn) and only_attn.layers[1].mlp.numel() == 0


def test_wanda_matches_hand_computation_from_full_activations():
    model, calib = tiny_model(), calibration()
    seen = []
    lin = model.model.layers[1].self_attn.o_proj
    handle = lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(calib)
    handle.remove()
    x = torch.cat(seen)  # (N·T, H·h)
    expected = (lin.weight.abs().sum(0) * x.norm(dim=0)).reshape(2, 32).sum(1)
    got = criteria.get("wanda_sp").score(model, calib).layers[1].attn
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["wanda_sp", "magnitude"])
def test_dead_kv_group_via_o_scores_zero_and_last(name):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, group_rows(model, 1, "q")] = 0
    s = criteria.get(name).score(model, calibration()).layers[0].attn
    assert s[1].item() == 0.0 and s[0] > 0


def test_dead_kv_group_via_v_is_zero_for_wanda_not_magnitude():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[group_rows(model, 0, "kv")] = 0
    assert criteria.get("wanda_sp").score(model, calibration()).layers[1].attn[0].item() == 0.0
    assert criteria.get("magnitude").score(model, calibration()).layers[1].attn[0].item() > 0.0  # data-blind


def test_dead_mlp_channel_scores_zero():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] = 0
        model.model.layers[1].mlp.up_proj.weight[77] = 0
    wanda = criteria.get("wanda_sp").score(model, calibration())
    assert wanda.layers[0].mlp[5].item() == 0.0 and wanda.layers[1].mlp[77].item() == 0.0
    assert (wanda.layers[0].mlp > 0).sum() == 127 and (wanda.layers[1].mlp > 0).sum() == 127
    assert criteria.get("magnitude").score(model, calibration()).layers[0].mlp.argmin() == 5


def test_wanda_is_invariant_to_micro_batching():
    model, calib = tiny_model(), calibration()
    one = criteria.get("wanda_sp", batch_size=16).score(model, calib)
    for bs in (8, 4, 3):
        other = criteria.get("wanda_sp", batch_size=bs).score(model, calib)
        for a, b in zip(one.layers, other.layers, strict=False):
            torch.testing.assert_close(a.attn, b.attn, rtol=1e-9, atol=0)
            torch.testing.assert_close(a.mlp, b.mlp, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["wanda_sp", "magnitude"])
def test_scores_follow_a_kv_group_permutation(name):
    model, calib = tiny_model(layers=1, num_key_value_heads=4), calibration()
    perm = [2, 0, 3, 1]
    before = criteria.get(name).score(model, calib).layers[0]
    permute_groups(model, 0, perm)
    after = criteria.get(name).score(model, calib).layers[0]
    torch.testing.assert_close(after.attn, before.attn[perm], rtol=1e-10, atol=0)
    torch.testing.assert_close(after.mlp, before.mlp, rtol=1e-10, atol=0)


def test_wanda_is_invariant_to_rescaling_a_group_but_magnitude_is_not():
    model, calib = tiny_model(), calibration()
    wanda0 = criteria.get("wanda_sp").score(model, calib).layers[0].attn
    mag0 = criteria.get("magnitude").score(model, calib).layers[0].attn
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # X_j -> 4 X_j through v, W[:, j] -> W[:, j] / 4: same function
        attn.v_proj.weight[group_rows(model, 1, "kv")] *= 4.0
        attn.o_proj.weight[:, group_rows(model, 1, "q")] /= 4.0
    torch.testing.assert_close(
        criteria.get("wanda_sp").score(model, calib).layers[0].attn, wanda0, rtol=1e-10, atol=0
    )
    mag1 = criteria.get("magnitude").score(model, calib).layers[0].attn
    torch.testing.assert_close(mag1[1], mag0[1] / 4.0)
