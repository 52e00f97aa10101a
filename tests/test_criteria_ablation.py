"""Known-answer tests for exact ablation ΔKL: dead units cost nothing, gates equal real weight surgery."""

from __future__ import annotations

import copy

import pytest
import torch
from test_criteria_support import calibration, group_rows, tiny_model

from workers import criteria, fitness
from workers.criteria import _gates
from workers.criteria._common import Geometry
from workers.criteria._replay import Replay


def _kl(dense_model, pruned_model, calib) -> float:
    """KL(p_dense ‖ p_pruned) per token, computed independently with F.kl_div."""
    with torch.no_grad():
        p = torch.log_softmax(dense_model(calib).logits, -1)
        q = torch.log_softmax(pruned_model(calib).logits, -1)
    kl = torch.nn.functional.kl_div(
        q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1]), log_target=True, reduction="sum"
    )
    return kl.item() / calib.numel()


def test_unit_ablation_equals_removing_the_weights():
    model, calib = tiny_model(), calibration(n=6)
    s = criteria.get("ablation").score(model, calib)
    cut = copy.deepcopy(model)
    with torch.no_grad():
        cut.model.layers[1].self_attn.o_proj.weight[:, group_rows(model, 0, "q")] = 0
    assert s.layers[1].attn[0].item() == pytest.approx(_kl(model, cut, calib), rel=1e-9)
    cut = copy.deepcopy(model)
    with torch.no_grad():
        cut.model.layers[0].mlp.up_proj.weight[17] = 0
    assert s.layers[0].mlp[17].item() == pytest.approx(_kl(model, cut, calib), rel=1e-9)
    assert (s.layers[0].mlp > 0).all() and (s.layers[1].attn > 0).all()


def test_dead_units_have_zero_ablation_cost():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, group_rows(model, 1, "q")] = 0
        model.model.layers[1].self_attn.v_proj.weight[group_rows(model, 1, "kv")] = 0
        model.model.layers[1].mlp.up_proj.weight[3] = 0
    s = criteria.get("ablation").score(model, calibration(n=6))
    assert abs(s.layers[0].attn[1].item()) < 1e-12 and abs(s.layers[1].attn[1].item()) < 1e-12
    assert abs(s.layers[1].mlp[3].item()) < 1e-12 and s.layers[1].mlp.argmin() == 3


def test_block_scores_equal_zeroing_the_sub_layer():
    model, calib = tiny_model(), calibration(n=6)
    blocks = criteria.get("ablation").blocks(model, calib)
    assert blocks.attn.shape == (2,) and blocks.mlp.shape == (2,)
    cut = copy.deepcopy(model)
    with torch.no_grad():
        cut.model.layers[1].mlp.down_proj.weight.zero_()
    assert blocks.mlp[1].item() == pytest.approx(_kl(model, cut, calib), rel=1e-9)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    assert criteria.get("ablation").blocks(model, calib).attn[0].item() == 0.0


def test_ablation_is_invariant_to_micro_batching():
    model, calib = tiny_model(layers=1), calibration(n=6)
    a = criteria.get("ablation", batch_size=6).score(model, calib, kinds=("attn",))
    b = criteria.get("ablation", batch_size=4).score(model, calib, kinds=("attn",))
    torch.testing.assert_close(a.layers[0].attn, b.layers[0].attn, rtol=1e-9, atol=0)
    assert fitness.kl(model, calib, fitness.Teacher.of(model, calib, batch_size=4), batch_size=4) == 0.0


def test_replay_from_any_layer_equals_the_full_forward_under_gates():
    model, calib = tiny_model(layers=3), calibration(n=5, t=16)
    replay = Replay(model, calib, batch_size=2)
    with torch.no_grad():
        full = torch.cat([model(ids).logits for ids in calib.split(2)])
    torch.testing.assert_close(torch.cat([lg for _, lg in replay.logits(0)]), full, rtol=0, atol=0)
    gates = _gates.ones(Geometry.of(model), ("attn", "mlp"))
    gates[1]["mlp"][:40] = 0.0
    gates[2]["attn"][0] = 0.5
    with _gates.gated(model, gates), torch.no_grad():
        gated = torch.cat([model(ids).logits for ids in calib.split(2)])
        replayed = torch.cat([lg for _, lg in replay.logits(1)])
    torch.testing.assert_close(replayed, gated, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(gated, full)
    with pytest.raises(ValueError, match="start layer 3"):
        next(replay.logits(3))
