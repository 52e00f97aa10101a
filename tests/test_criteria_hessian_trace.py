"""Known answers for HAP's relative Hessian trace: the Hutchinson trace lies within its confidence interval of the
exact trace (double backprop, one weight at a time); chunking does not change it; zero weights score zero; a job
takes its probe count and seed by name, and bad ones are refused."""

from __future__ import annotations

import pytest
import torch
from test_criteria_support import calibration, group_rows, tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel

from darwinfront.core.methods import parse_spec
from workers import criteria, database
from workers.criteria import _gates
from workers.criteria._common import Geometry
from workers.criteria.hessian_trace import hutchinson, weight_norms
from workers.job_inputs import database_options
from workers.levels import LevelTable


def _channel_weights(model, layer: int, unit: int) -> list[tuple[torch.Tensor, tuple]]:
    mlp = model.model.layers[layer].mlp
    return [(mlp.gate_proj.weight, (unit,)), (mlp.up_proj.weight, (unit,)), (mlp.down_proj.weight, (slice(None), unit))]


def _exact_trace(model, ids, targets) -> float:
    """Σ_i ∂²T/∂w_i² over the weights `targets` (weight, index), T = mean CE, by double backprop per weight."""
    params = [w for w, _ in targets]
    for w in params:
        w.requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        loss = _gates.sample_ce(model, ids).sum() / _gates.predictions(ids)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        total = 0.0
        for (w, index), g in zip(targets, grads, strict=True):
            flat = torch.arange(w.numel()).reshape(w.shape)[index].reshape(-1)
            for i in flat.tolist():
                second = torch.autograd.grad(g.reshape(-1)[i], w, retain_graph=True)[0]
                total += second.reshape(-1)[i].item()
    return total


@pytest.mark.parametrize("unit", [5, 40])
def test_hutchinson_trace_is_within_its_confidence_interval_of_the_exact_trace(unit):
    model, calib, layer = tiny_model(layers=1), calibration(n=4, t=16), 0
    exact = _exact_trace(model, calib, _channel_weights(model, layer, unit))
    traces = hutchinson(model, calib, ("mlp",), probes=96, seed=3, batch_size=4)
    mean, err = traces.mean[layer]["mlp"][unit].item(), traces.stderr[layer]["mlp"][unit].item()
    assert abs(mean - exact) <= 3.5 * err, (mean, exact, err)
    assert err < 0.6 * abs(exact)  # the interval is informative (it excludes 0), not a pass by width


def test_score_is_the_trace_per_parameter_times_the_squared_weight_norm():
    model, calib = tiny_model(), calibration(n=4, t=16)
    scores = criteria.get("hessian_trace", probes=4, seed=1, batch_size=4).score(model, calib)
    traces = hutchinson(model, calib, probes=4, seed=1, batch_size=4)
    geo = Geometry.of(model)
    for kind, width in (("attn", 2), ("mlp", 128)):
        count, norm2 = weight_norms(model, kind, 1, geo)
        assert getattr(scores.layers[1], kind).shape == (width,)
        assert count[0].item() == (2 * 2 * 16 * 64 + 2 * 16 * 64 if kind == "attn" else 3 * 64)
        torch.testing.assert_close(getattr(scores.layers[1], kind), traces.mean[1][kind] / count * norm2)


def test_micro_batches_do_not_change_the_estimate_and_the_seed_fixes_it():
    model, calib = tiny_model(), calibration(n=4, t=16)
    whole = criteria.get("hessian_trace", probes=3, batch_size=4).score(model, calib).layers[0]
    parts = criteria.get("hessian_trace", probes=3, batch_size=1).score(model, calib).layers[0]
    other = criteria.get("hessian_trace", probes=3, seed=9, batch_size=4).score(model, calib).layers[0]
    torch.testing.assert_close(whole.mlp, parts.mlp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(whole.attn, parts.attn, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(whole.mlp, other.mlp)


def test_a_unit_with_zero_weights_scores_zero():
    model = tiny_model()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[1].mlp
    with torch.no_grad():
        q, kv = group_rows(model, 1, "q"), group_rows(model, 1, "kv")
        for w, index in ((attn.q_proj.weight, q), (attn.k_proj.weight, kv), (attn.v_proj.weight, kv)):
            w[index] = 0
        attn.o_proj.weight[:, q] = 0
        mlp.gate_proj.weight[7] = 0
        mlp.up_proj.weight[7] = 0
        mlp.down_proj.weight[:, 7] = 0
    scores = criteria.get("hessian_trace", probes=2).score(model, calibration(n=4, t=16)).layers
    assert scores[0].attn[1].item() == 0.0 and scores[0].attn[0].item() != 0.0
    assert scores[1].mlp[7].item() == 0.0 and (scores[1].mlp != 0).sum() == 127


def test_a_job_sets_its_probes_and_bad_options_are_refused():
    spec = parse_spec({"model": {"source": "builtin:micro-llama"},
                       "prune": {"criterion": "hessian_trace", "criterion_options": {"probes": 4, "seed": 2}}})
    assert spec.prune.criterion_options == {"probes": 4, "seed": 2}
    for options, message in (({"probes": 0}, "probes.*must be in \\[1, 1024\\]"), ({"eps": 0.1}, "no option 'eps'"),
                             ({"probes": 2.5}, "must be an int")):
        with pytest.raises(ValueError, match=message):
            parse_spec({"model": {"source": "builtin:micro-llama"},
                        "prune": {"criterion": "hessian_trace", "criterion_options": options}})
    with pytest.raises(ValueError, match="criterion 'taylor' has no option 'probes'; its options: none"):
        parse_spec({"model": {"source": "builtin:micro-llama"},
                    "prune": {"criterion": "taylor", "criterion_options": {"probes": 4}}})


def test_the_jobs_options_name_and_fill_its_level_database(tmp_path):
    spec = parse_spec({"model": {"source": "builtin:micro-llama"},
                       "prune": {"criterion": "hessian_trace", "criterion_options": {"probes": 2}}})
    assert database_options(spec) == {"probes": 2}
    model, calib = tiny_model(), calibration(n=4, t=16)
    table = LevelTable(attn_units=2, attn_step=1, mlp_units=128, mlp_step=16)
    db = database.build(model, calib, criterion="hessian_trace", table=table, options={"probes": 2}, root=tmp_path)
    other = database.build(model, calib, criterion="hessian_trace", table=table, options={"probes": 3}, root=tmp_path)
    scores = criteria.get("hessian_trace", probes=2).score(model, calib).layers[1]
    assert db.key != other.key and db.options == {"probes": 2}
    assert db.orders[1]["mlp"][0] == int(scores.mlp.argmin()) and db.orders[1]["attn"][0] == int(scores.attn.argmin())
