"""Known answers for MINI-LLM's hybrid criterion: Wanda-sp's magnitude × activation times |ĝ|, ĝ a forward-only
estimate of the gate gradient that agrees with autograd as SPSA theory says; it runs with autograd off; planted
dead units score zero; a job sets its probes, eps and seed."""

from __future__ import annotations

import math

import pytest
import torch
from test_criteria_support import calibration, group_rows, tiny_model

from darwinfront.core.methods import parse_spec
from workers import criteria
from workers.criteria.gate import gate_gradients, spsa_gradients


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


def test_the_forward_only_gradient_agrees_with_autograd_as_spsa_theory_says():
    model, calib = tiny_model(layers=1), calibration(n=4, t=16)
    true, _ = gate_gradients(model, calib, batch_size=4)
    probes = 128
    est = spsa_gradients(model, calib, ("attn", "mlp"), probes=probes, eps=1e-4, seed=0, batch_size=4)
    for layer in range(1):
        for kind, d in (("attn", 2), ("mlp", 128)):
            bound = math.sqrt(probes / (probes + d + 1))  # E cos(ĝ, g) for K Rademacher probes over d gates
            assert _cos(est[layer][kind], true[layer][kind]) >= bound - 0.1, (layer, kind)


def test_the_score_is_wanda_times_the_gradient_estimate_and_needs_no_autograd():
    model, calib = tiny_model(), calibration(n=4, t=16)
    with torch.no_grad():  # forward passes only: a backward would fail here
        scores = criteria.get("mini_llm", probes=16, seed=2, batch_size=4).score(model, calib)
    assert all(p.grad is None for p in model.parameters())
    wanda = criteria.get("wanda_sp", batch_size=4).score(model, calib)
    est = spsa_gradients(model, calib, ("attn", "mlp"), probes=16, eps=1e-3, seed=2, batch_size=4)
    for i, (s, w) in enumerate(zip(scores.layers, wanda.layers, strict=True)):
        assert s.attn.shape == (2,) and s.mlp.shape == (128,)
        torch.testing.assert_close(s.attn, w.attn * est[i]["attn"].abs())
        torch.testing.assert_close(s.mlp, w.mlp * est[i]["mlp"].abs())


def test_planted_dead_units_score_zero():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, group_rows(model, 1, "q")] = 0  # its output goes nowhere
        model.model.layers[1].mlp.up_proj.weight[9] = 0  # channel 9's input to down_proj is 0
    scores = criteria.get("mini_llm", probes=8).score(model, calibration(n=4, t=16)).layers
    assert scores[0].attn[1].item() == 0.0 and scores[0].attn[0] > 0
    assert scores[1].mlp[9].item() == 0.0 and (scores[1].mlp > 0).sum() == 127


def test_a_job_sets_probes_eps_and_seed():
    spec = parse_spec({"model": {"source": "builtin:micro-llama"},
                       "prune": {"criterion": "mini_llm", "criterion_options": {"probes": 8, "eps": 1e-2}}})
    assert spec.prune.criterion_options == {"probes": 8, "eps": 0.01}
    built = criteria.get("mini_llm", **spec.prune.criterion_options)
    assert (built.probes, built.eps, built.seed) == (8, 0.01, 0)
    with pytest.raises(ValueError, match="eps.*must be in"):
        parse_spec({"model": {"source": "builtin:micro-llama"},
                    "prune": {"criterion": "mini_llm", "criterion_options": {"eps": 2.0}}})
