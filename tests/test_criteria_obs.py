"""Known-answer tests for ZipLM / OBS: least-squares optimal updates, dead units first, nested levels, and the
blocked `obs_prune` against the eager greedy loop it replaced (kept here verbatim as the reference)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from test_criteria_support import calibration, group_rows, tiny_model

from workers import criteria
from workers.criteria._common import Geometry, input_stats
from workers.criteria.base import LinearLevels
from workers.criteria.obs import obs_levels, obs_prune

# The eager greedy loop as `workers/criteria/obs.py` had it before the blocked version (commit aba2dec), verbatim
# but for the names: every step touches the whole (in, in) Hinv. benchmarks/database_build.py times it too.


def _reference_prepare(
    weight: torch.Tensor, hessian: torch.Tensor, rel_damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().to(device=hessian.device, dtype=torch.float64).clone()  # (out, in)
    h = hessian.to(torch.float64).clone()  # (in, in)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # a column that never sees input is free to remove: zero it, keep H invertible
    w[:, dead] = 0.0
    h.diagonal().add_(rel_damp * h.diagonal().mean())
    return w, torch.cholesky_inverse(torch.linalg.cholesky(h))


def _reference_group_costs(w: torch.Tensor, hinv: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Removal cost of every group and the inverses of Hinv's diagonal blocks, (n,) and (n, group, group)."""
    n = w.shape[1] // group
    if group == 1:
        binv = (1.0 / hinv.diagonal()).reshape(n, 1, 1)
        return (w * w).sum(0) * binv.reshape(n), binv
    blocks = hinv.reshape(n, group, n, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n, g, g)
    binv = torch.linalg.inv(blocks)
    wg = w.reshape(w.shape[0], n, group)  # (out, n, g)
    return torch.einsum("ong,ngh,onh->n", wg, binv, wg), binv


def _reference_obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group: int,
    counts: Sequence[int],
    rel_damp: float = 1e-2,
) -> LinearLevels:
    """Greedy OBS removal of `group`-wide column blocks of `weight` (out, in) given input Gram `hessian`.

    Runs until max(counts) groups are removed and snapshots the updated weight at every count in `counts`.
    """
    n = weight.shape[1] // group
    if weight.shape[1] != n * group or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"weight {tuple(weight.shape)} / hessian {tuple(hessian.shape)} / group {group} mismatch"
        )
    if any(not 0 <= c <= n for c in counts):
        raise ValueError(f"removal counts {list(counts)} outside 0..{n}")
    w, hinv = _reference_prepare(weight, hessian, rel_damp)
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    order: list[int] = []
    snaps: dict[int, torch.Tensor] = {}
    eye = torch.eye(group, dtype=w.dtype, device=w.device)
    for step in range(1, max(counts, default=0) + 1):
        cost, binv = _reference_group_costs(w, hinv, group)
        u = int(torch.where(alive, cost, torch.inf).argmin())
        cols = slice(u * group, (u + 1) * group)
        m = binv[u]  # (g, g) = (Hinv_gg)⁻¹
        w -= w[:, cols] @ m @ hinv[cols, :]
        hinv -= hinv[:, cols] @ m @ hinv[cols, :]
        w[:, cols] = 0.0  # exactly zero (the update leaves rounding residue)
        hinv[cols, :] = 0.0
        hinv[:, cols] = 0.0
        hinv[cols, cols] = eye  # keeps the removed block invertible; its cost is masked anyway
        alive[u] = False
        order.append(u)
        if step in counts:
            snaps[step] = w.clone()
    snaps[0] = weight.detach()  # level 0 is the dense weight as given, dead columns included
    weights = {c: snaps[c].to(device=weight.device, dtype=weight.dtype).clone() for c in sorted(counts)}
    return LinearLevels(order=torch.tensor(order, dtype=torch.long), weights=weights)


def _problem(tokens: int = 300, width: int = 12, out: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, width, generator=gen, dtype=torch.float64) @ mix  # correlated inputs
    w = torch.randn(out, width, generator=gen, dtype=torch.float64)
    return x, w


def _refit(x: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Least-squares refit of y = x wᵀ from the kept columns only (full-size weight, others zero)."""
    sol = torch.linalg.lstsq(x[:, keep], x @ w.T).solution  # (kept, out)
    full = torch.zeros_like(w)
    full[:, keep] = sol.T
    return full


@pytest.mark.parametrize("group", [1, 4])
def test_obs_updates_equal_the_least_squares_refit(group):
    x, w = _problem()
    res = obs_prune(w, x.T @ x, group=group, counts=[1, 2], rel_damp=0.0)
    for count in (1, 2):
        removed = torch.cat([torch.arange(u * group, (u + 1) * group) for u in res.order[:count].tolist()])
        keep = torch.ones(12, dtype=torch.bool)
        keep[removed] = False
        torch.testing.assert_close(res.weights[count], _refit(x, w, keep), rtol=1e-8, atol=1e-10)
        assert torch.all(res.weights[count][:, removed] == 0)


def test_obs_first_removal_is_the_cheapest_single_removal():
    x, w = _problem(seed=3)
    errors = []
    for j in range(12):
        keep = torch.arange(12) != j
        errors.append(((x @ w.T - x @ _refit(x, w, keep).T) ** 2).sum())
    res = obs_prune(w, x.T @ x, group=1, counts=[1], rel_damp=0.0)
    assert res.order[0].item() == int(torch.stack(errors).argmin())


def test_obs_removes_a_linearly_dependent_column_for_free():
    x, w = _problem(seed=5)
    x[:, 7] = 0.5 * x[:, 2] - 2.0 * x[:, 9]
    res = obs_prune(w, x.T @ x, group=1, counts=[1], rel_damp=1e-12)
    assert res.order[0].item() in (2, 7, 9)
    err = ((x @ w.T - x @ res.weights[1].T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert err < 1e-8


def test_obs_refuses_bad_counts():
    x, w = _problem()
    with pytest.raises(ValueError, match="13"):
        obs_prune(w, x.T @ x, group=1, counts=[13])


def test_obs_levels_are_nested_and_zero_exactly_the_removed_units():
    model = tiny_model()
    res = obs_levels(model, calibration(), {"attn": [0, 1, 2], "mlp": [0, 32, 64, 128]})
    assert len(res) == 2
    for layer, lv in zip(model.model.layers, res, strict=True):
        torch.testing.assert_close(lv["attn"].weights[0], layer.self_attn.o_proj.weight, rtol=0, atol=0)
        assert sorted(lv["attn"].order.tolist()) == [0, 1] and sorted(lv["mlp"].order.tolist()) == list(
            range(128)
        )
        for count, wt in lv["mlp"].weights.items():
            dead = (wt == 0).all(0)
            assert set(dead.nonzero().flatten().tolist()) == set(lv["mlp"].order[:count].tolist())
        a1 = lv["attn"].weights[1].reshape(64, 2, 32)
        assert (a1[:, lv["attn"].order[0]] == 0).all() and (a1[:, lv["attn"].order[1]] != 0).any()


def test_obs_levels_reconstruct_better_than_plain_masking():
    model, calib = tiny_model(), calibration()
    lin = model.model.layers[0].mlp.down_proj
    seen = []
    handle = lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 128)))
    res = obs_levels(model, calib, {"mlp": [32]}, rel_damp=1e-4)[0]["mlp"]
    handle.remove()
    x = torch.cat(seen)
    dense = x @ lin.weight.T
    masked = lin.weight.clone()
    masked[:, res.order[:32]] = 0
    obs_err = ((dense - x @ res.weights[32].T) ** 2).sum()
    mask_err = ((dense - x @ masked.T) ** 2).sum()
    assert obs_err < 0.8 * mask_err  # measured 0.65; <= 1 is guaranteed (LS refit)


@pytest.mark.parametrize("where", ["o", "v"])
def test_obs_removes_a_dead_kv_group_first(where):
    model = tiny_model()
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        if where == "o":
            attn.o_proj.weight[:, group_rows(model, 1, "q")] = 0
        else:
            attn.v_proj.weight[group_rows(model, 1, "kv")] = 0
    s = criteria.get("obs").score(model, calibration(), kinds=("attn",))
    assert s.layers[1].attn.tolist() == [1.0, 0.0] and s.layers[1].mlp.numel() == 0


def test_obs_removes_dead_mlp_channels_first():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] = 0
        model.model.layers[0].mlp.up_proj.weight[77] = 0
    s = criteria.get("obs").score(model, calibration()).layers[0].mlp
    assert sorted(s.tolist()) == list(range(128))
    assert {s[5].item(), s[77].item()} == {0.0, 1.0}


def test_obs_order_is_invariant_to_micro_batching():
    model, calib = tiny_model(), calibration()
    a = criteria.get("obs", batch_size=16).score(model, calib)
    b = criteria.get("obs", batch_size=5).score(model, calib)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.equal(x.attn, y.attn) and torch.equal(x.mlp, y.mlp)


def _layer_problem(out: int, width: int, seed: int, dead: Sequence[int] = ()):
    """A random layer with correlated inputs; the `dead` columns never see input (zero rows and columns of H)."""
    x, w = _problem(tokens=2 * width, width=width, out=out, seed=seed)
    x[:, list(dead)] = 0.0
    return w, x.T @ x


def _assert_same_levels(got: LinearLevels, want: LinearLevels) -> None:
    """Identical removal order, the same exact zeros, and weights within 1e-9 of the reference's largest entry."""
    assert torch.equal(got.order, want.order)
    assert list(got.weights) == list(want.weights)
    for count, weight in want.weights.items():
        assert got.weights[count].dtype == weight.dtype and got.weights[count].shape == weight.shape
        assert torch.equal(got.weights[count] == 0, weight == 0), count
        assert (got.weights[count] - weight).abs().max() <= 1e-9 * weight.abs().max(), count


@pytest.mark.parametrize(
    ("out", "width", "group", "counts", "dead", "block"),
    [
        (5, 12, 1, [0, 3, 12], (), 64),  # one block, every column removed
        (7, 40, 1, [5, 17, 40], (3, 9, 10), 8),  # dead columns tie at cost 0: the lowest index goes first
        (16, 100, 1, list(range(0, 101, 10)), (1, 2, 3, 50), 16),  # 10 levels; blocks cut short at each level
        (24, 130, 1, [0, 1, 64, 129], (0, 129), 7),
        (32, 200, 1, [0, 50, 130, 200], (7,), None),  # the default block, 200 not a multiple of it
        (5, 12, 4, [0, 1, 3], (), 64),
        (7, 40, 4, [2, 7, 10], (3, 9, 10), 3),  # one group partly dead
        (16, 96, 8, [5, 12], tuple(range(16, 24)), 5),  # group 2 wholly dead
        (12, 96, 32, [1, 2, 3], (), 2),
    ],
)
def test_blocked_obs_gives_the_eager_loops_order_and_weights(out, width, group, counts, dead, block):
    w, h = _layer_problem(out, width, seed=width + group, dead=dead)
    options = {} if block is None else {"block": block}
    _assert_same_levels(obs_prune(w, h, group, counts, **options), _reference_obs_prune(w, h, group, counts))


def test_blocked_obs_keeps_the_weights_dtype_and_refuses_a_bad_block():
    w, h = _layer_problem(16, 48, seed=2, dead=(5,))
    got = obs_prune(w.float(), h, 1, [0, 7, 30], block=4)
    _assert_same_levels(got, _reference_obs_prune(w.float(), h, 1, [0, 7, 30]))
    assert got.weights[7].dtype == torch.float32
    with pytest.raises(ValueError, match="block"):
        obs_prune(w, h, 1, [3], block=0)


def test_obs_levels_equal_one_pass_statistics_pruned_by_the_eager_loop():
    model, calib = tiny_model(layers=3), calibration()
    levels = {"attn": [0, 1, 2], "mlp": [0, 40, 100, 128]}
    width = {"attn": Geometry.of(model).attn_width, "mlp": 1}
    stats = input_stats(model, calib, ("attn", "mlp"), batch_size=8, gram=True)  # every layer at once, as before
    got = obs_levels(model, calib, levels)
    assert len(got) == 3
    for layer, st, res in zip(model.model.layers, stats, got, strict=True):
        for kind, lin in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            _assert_same_levels(res[kind], _reference_obs_prune(lin.weight, st[kind].xtx, width[kind], levels[kind]))


def test_obs_levels_of_chosen_layers_match_all_layers_and_report_progress():
    model, calib = tiny_model(layers=3), calibration()
    levels = {"mlp": [0, 16, 64]}
    every = obs_levels(model, calib, levels)
    calls = []
    some = obs_levels(model, calib, levels, layers=[2, 0], on_layer=lambda *a: calls.append(a))
    for res, i in zip(some, [2, 0], strict=True):
        assert torch.equal(res["mlp"].order, every[i]["mlp"].order)
        assert all(torch.equal(res["mlp"].weights[c], every[i]["mlp"].weights[c]) for c in levels["mlp"])
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)] and 0 <= calls[0][2] <= calls[1][2]
    for bad in ([3], [1, 1], [-1]):
        with pytest.raises(ValueError, match="distinct indices"):
            obs_levels(model, calib, levels, layers=bad)


def test_blocked_obs_on_wide_attention_blocks_runs_on_two_threads():
    """Three 192-wide groups (SmolLM2's KV groups): batched LU inverses of such blocks hang in MKL at 2 threads."""
    code = (
        "import torch; from workers.criteria.obs import obs_prune; torch.set_num_threads(2); "
        "g = torch.Generator().manual_seed(0); x = torch.randn(1200, 576, generator=g, dtype=torch.float64); "
        "print(obs_prune(torch.randn(64, 576, dtype=torch.float64), x.T @ x, 192, [1, 2, 3]).order.tolist())"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert done.returncode == 0 and sorted(json.loads(done.stdout)) == [0, 1, 2], done.stderr[-2000:]
