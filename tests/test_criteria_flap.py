"""Known-answer tests for FLAP: constant columns are free, the bias keeps the output, the variance is exact."""

from __future__ import annotations

import pytest
import torch
from test_criteria_support import calibration, group_rows, permute_groups, tiny_model

from workers import criteria
from workers.criteria._common import KINDS, ColumnStats, input_stats
from workers.criteria.flap import flap_bias, fluctuation_columns
from workers.criteria.wanda_sp import wanda_columns


def _linear_with_constant_column(c: float = 0.37):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 25, 10, generator=gen, dtype=torch.float64) + 3.0  # (batch, tokens, in), mean far from 0
    x[..., 6] = c
    w = torch.randn(7, 10, generator=gen, dtype=torch.float64)
    return x, w


def test_constant_column_scores_zero_for_flap_not_wanda():
    x, w = _linear_with_constant_column()
    st = ColumnStats(10)
    for chunk in x.split(1):  # streamed in micro-batches
        st.update(chunk)
    flap, wanda = fluctuation_columns(w, st.var), wanda_columns(w, st.norm)
    assert flap[6].item() == 0.0 and (flap[torch.arange(10) != 6] > 0).all()
    assert wanda[6] > 0
    flat = x.reshape(-1, 10)
    torch.testing.assert_close(st.var, torch.var(flat, dim=0, unbiased=False), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(st.mean, flat.mean(0), rtol=1e-12, atol=0)


def test_flap_bias_keeps_the_output_of_a_constant_column_and_the_mean_of_others():
    x, w = _linear_with_constant_column()
    st = ColumnStats(10)
    st.update(x)
    flat = x.reshape(-1, 10)
    dense = flat @ w.T
    only_const = torch.zeros(10, dtype=torch.bool)
    only_const[6] = True
    kept = flat.clone()
    kept[:, 6] = 0
    torch.testing.assert_close(kept @ w.T + flap_bias(w, st.mean, only_const), dense, rtol=0, atol=1e-10)
    several = torch.tensor([1, 0, 0, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    kept = flat.clone()
    kept[:, several] = 0
    compensated = kept @ w.T + flap_bias(w, st.mean, several)
    torch.testing.assert_close(compensated.mean(0), dense.mean(0), rtol=0, atol=1e-10)
    assert ((compensated - dense) ** 2).sum() < ((kept @ w.T - dense) ** 2).sum()


def test_flap_level_shifts_are_the_removed_units_columns_times_their_means():
    model, calib = tiny_model(), calibration()
    counts = {"attn": [0, 1], "mlp": [0, 2]}
    found = dict(criteria.get("flap", bias_compensation=True).level_weights(model, calib, counts))
    means = input_stats(model, calib, KINDS, batch_size=8)
    attn, mlp = found[1]["attn"], found[0]["mlp"]
    assert set(attn.shifts) == {1} and not attn.weights  # a shift per level that removes something, no weights
    rows = group_rows(model, int(attn.order[0]), "q")  # the o_proj columns of the KV group removed first
    lin = model.model.layers[1].self_attn.o_proj
    expected = lin.weight.detach().double()[:, rows] @ means[1]["attn"].mean[rows]
    torch.testing.assert_close(attn.shifts[1], expected.to(lin.weight.dtype))
    channels = mlp.order[:2]
    down = model.model.layers[0].mlp.down_proj.weight.detach().double()
    torch.testing.assert_close(mlp.shifts[2], (down[:, channels] @ means[0]["mlp"].mean[channels]).to(lin.weight.dtype))
    scores = criteria.get("flap").score(model, calib).layers[1].attn  # the order the scores give
    assert int(attn.order[0]) == int(scores.argmin())


@pytest.mark.parametrize("where", ["o", "v"])
def test_flap_dead_kv_group_scores_zero(where):
    model = tiny_model()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        if where == "o":
            attn.o_proj.weight[:, group_rows(model, 0, "q")] = 0
        else:
            attn.v_proj.weight[group_rows(model, 0, "kv")] = 0
    s = criteria.get("flap").score(model, calibration()).layers[0].attn
    assert s[0].item() == 0.0 and s[1] > 0


def test_flap_dead_mlp_channel_scores_zero():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[40] = 0
        model.model.layers[1].mlp.down_proj.weight[:, 41] = 0
    s = criteria.get("flap").score(model, calibration()).layers[1].mlp
    assert s[40].item() == 0.0 and s[41].item() == 0.0 and (s > 0).sum() == 126


def test_flap_is_invariant_to_micro_batching_and_follows_permutations():
    model, calib = tiny_model(layers=1, num_key_value_heads=4), calibration()
    a = criteria.get("flap", batch_size=16).score(model, calib).layers[0]
    b = criteria.get("flap", batch_size=3).score(model, calib).layers[0]
    torch.testing.assert_close(a.attn, b.attn, rtol=1e-9, atol=0)
    torch.testing.assert_close(a.mlp, b.mlp, rtol=1e-9, atol=0)
    perm = [1, 3, 0, 2]
    permute_groups(model, 0, perm)
    c = criteria.get("flap").score(model, calib).layers[0]
    torch.testing.assert_close(c.attn, a.attn[perm], rtol=1e-10, atol=0)
