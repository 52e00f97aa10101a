"""Known answers for NViT's group saliency: the square of the loss's derivative along the unit's own weights,
averaged over micro-batches; a dead unit scores zero; a job spec and a level database take it by name."""

from __future__ import annotations

import pytest
import torch
from test_criteria_support import calibration, group_rows, tiny_model

from darwinfront.core.methods import parse_spec
from workers import criteria, database
from workers.criteria import _gates
from workers.levels import LevelTable


def _mean_ce(model, ids) -> float:
    with torch.no_grad():
        return (_gates.sample_ce(model, ids).sum() / _gates.predictions(ids)).item()


def _coupled_weights(model, layer: int, kind: str, unit: int) -> list[tuple[torch.Tensor, tuple]]:
    """(weight, index) of every weight a unit couples: a KV group's q/k/v rows and o_proj columns, a channel's
    gate/up rows and down_proj column."""
    if kind == "mlp":
        mlp = model.model.layers[layer].mlp
        return [(mlp.gate_proj.weight, (unit,)), (mlp.up_proj.weight, (unit,)),
                (mlp.down_proj.weight, (slice(None), unit))]
    attn = model.model.layers[layer].self_attn
    q, kv = group_rows(model, unit, "q"), group_rows(model, unit, "kv")
    return [(attn.q_proj.weight, (q,)), (attn.k_proj.weight, (kv,)), (attn.v_proj.weight, (kv,)),
            (attn.o_proj.weight, (slice(None), q))]


def _scaled_derivative(model, ids, layer: int, kind: str, unit: int, eps: float = 1e-5) -> float:
    """dT/ds at s = 0 with the unit's coupled weights scaled by 1 + s, by central differences."""
    targets = _coupled_weights(model, layer, kind, unit)
    saved = [w.detach().clone() for w, _ in targets]

    def at(s: float) -> float:
        with torch.no_grad():
            for (w, index), original in zip(targets, saved, strict=True):
                w.copy_(original)
                w[index] *= 1 + s
        return _mean_ce(model, ids)

    plus, minus = at(eps), at(-eps)
    with torch.no_grad():
        for (w, _), original in zip(targets, saved, strict=True):
            w.copy_(original)
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize(("layer", "kind", "unit"), [(0, "attn", 1), (1, "attn", 0), (1, "mlp", 7), (0, "mlp", 30)])
def test_one_batch_scores_the_squared_derivative_along_the_units_weights(layer, kind, unit):
    model, calib = tiny_model(), calibration(n=6)
    scores = criteria.get("nvit", batch_size=6).score(model, calib).layers[layer]
    expected = _scaled_derivative(model, calib, layer, kind, unit) ** 2
    assert getattr(scores, kind)[unit].item() == pytest.approx(expected, rel=1e-5)


def test_micro_batches_average_their_own_squares():
    model, calib = tiny_model(), calibration(n=6)
    whole = criteria.get("nvit", batch_size=3).score(model, calib).layers[1].mlp
    halves = [criteria.get("nvit", batch_size=3).score(model, part).layers[1].mlp for part in calib.split(3)]
    torch.testing.assert_close(whole, (halves[0] + halves[1]) / 2, rtol=1e-12, atol=0)
    one = criteria.get("nvit", batch_size=6).score(model, calib).layers[1].mlp
    assert not torch.allclose(whole, one)  # the square is taken per micro-batch, before the mean


def test_a_dead_kv_group_and_a_dead_channel_score_zero():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, group_rows(model, 0, "q")] = 0  # its output goes nowhere
        model.model.layers[1].mlp.down_proj.weight[:, 12] = 0
    scores = criteria.get("nvit").score(model, calibration()).layers
    assert scores[0].attn[0].item() == 0.0 and scores[0].attn[1] > 0
    assert scores[1].mlp[12].item() == 0.0 and (scores[1].mlp > 0).sum() == scores[1].mlp.numel() - 1


def test_a_job_spec_and_a_level_database_take_it_by_name(tmp_path):
    spec = parse_spec({"model": {"source": "builtin:micro-llama"}, "prune": {"criterion": "nvit"}})
    assert spec.prune.criterion == "nvit"
    model, calib = tiny_model(), calibration()
    table = LevelTable(attn_units=2, attn_step=1, mlp_units=model.config.intermediate_size, mlp_step=16)
    db = database.build(model, calib, criterion="nvit", table=table, root=tmp_path)
    scores = criteria.get("nvit").score(model, calib).layers[0]
    assert db.criterion == "nvit" and not db.stores_weights
    assert db.orders[0]["attn"][0] == int(scores.attn.argmin()) and db.orders[0]["mlp"][0] == int(scores.mlp.argmin())
