"""NViT's global ranking: block saliencies are the squared derivative along the whole block (the units' scale), a
dead sub-layer is removed whole and first, the latency objective orders the list, and a cut reaches its target."""

from __future__ import annotations

import pytest
import torch
from test_criteria_nvit import _mean_ce
from test_criteria_support import calibration, tiny_model

from workers import slicing
from workers.criteria.nvit import saliencies
from workers.nvit_global import LatencyTable, global_ranking, latency_cut, measure_latency_table, objective


def _block_derivative(model, ids, layer: int, block: str, eps: float = 1e-5) -> float:
    """dT/ds at s = 0 with every weight of the block (attention, MLP or both sub-layers) scaled by 1 + s."""
    mods = {"attn": [model.model.layers[layer].self_attn], "mlp": [model.model.layers[layer].mlp]}
    mods["layer"] = mods["attn"] + mods["mlp"]
    weights = [lin.weight for m in mods[block] for lin in m.modules() if isinstance(lin, torch.nn.Linear)]
    saved = [w.detach().clone() for w in weights]

    def at(s: float) -> float:
        with torch.no_grad():
            for w, original in zip(weights, saved, strict=True):
                w.copy_(original * (1 + s))
        return _mean_ce(model, ids)

    plus, minus = at(eps), at(-eps)
    with torch.no_grad():
        for w, original in zip(weights, saved, strict=True):
            w.copy_(original)
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize(("layer", "block"), [(0, "attn"), (1, "mlp"), (1, "layer")])
def test_a_blocks_saliency_is_the_squared_derivative_along_all_its_weights(layer, block):
    model, calib = tiny_model(), calibration(n=4, t=16)
    _, blocks = saliencies(model, calib, batch_size=4)
    assert blocks[layer][block] == pytest.approx(_block_derivative(model, calib, layer, block) ** 2, rel=1e-5)


TABLE = LatencyTable(dense_ms=10.0, unit_ms={"attn": 0.5, "mlp": 0.01}, block_ms={"attn": 1.5, "mlp": 1.6},
                     setup={})


def test_a_dead_attention_goes_whole_and_first_and_the_cut_reaches_its_target():
    model, calib = tiny_model(), calibration(n=4, t=16)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()  # layer 1's attention adds nothing
    units, blocks = saliencies(model, calib, batch_size=2)
    assert blocks[1]["attn"] == 0.0 and (units[1]["attn"] == 0).all()
    ranking = global_ranking(units, blocks, TABLE)
    assert ranking[0].objective == 0.0 and {(s.layer, s.kind) for s in ranking[:3]} <= {(1, "attn"), (1, "attn_block")}
    assert [s.objective for s in ranking] == sorted(s.objective for s in ranking)
    genome, saved = latency_cut(ranking, TABLE, slicing.dims(model), target_ms=2.0)
    assert genome.attn[1] == 2 and saved >= 2.0  # the dead attention is all gone
    assert sum(genome.attn) + sum(genome.mlp) > 2  # and the rest of the 2 ms came from elsewhere


def test_the_objective_is_nvits_penalty_or_the_saliency_per_millisecond():
    assert objective(3.0, 2.0, lam=0.5) == 2.0 and objective(3.0, 2.0, lam=None) == 1.5
    assert objective(3.0, 0.0, lam=None) == float("inf")  # saves nothing: never worth removing
    units = [{"attn": torch.tensor([1.0, 4.0]), "mlp": torch.tensor([0.02, 0.5])}]
    blocks = [{"attn": 6.0, "mlp": 1.0, "layer": 9.0}]
    ratio = [(s.kind, s.unit) for s in global_ranking(units, blocks, TABLE)]
    assert ratio[:2] == [("mlp_block", -1), ("mlp", 0)]  # 0.625 and 2 per ms
    plain = [(s.kind, s.unit) for s in global_ranking(units, blocks, TABLE, lam=0.0)]
    assert plain[:3] == [("mlp", 0), ("mlp", 1), ("attn", 0)]


def test_a_sub_layer_removed_unit_by_unit_saves_its_blocks_time():
    units = [{"attn": torch.tensor([5.0, 6.0]), "mlp": torch.zeros(3)},
             {"attn": torch.tensor([9.0, 9.5]), "mlp": torch.tensor([7.0, 8.0, 9.0])}]
    blocks = [{"attn": 8.0, "mlp": 3.0}, {"attn": 9.0, "mlp": 7.0}]
    ranking = global_ranking(units, blocks, TABLE, lam=0.0)
    assert [(s.layer, s.kind) for s in ranking[:3]] == [(0, "mlp")] * 3
    d = slicing.Dims(n_layers=2, hidden=8, n_kv=2, group=1, head_dim=4, intermediate=3, attn_bias=False,
                     mlp_bias=False)
    genome, saved = latency_cut(ranking[:3], TABLE, d, target_ms=100.0)
    assert genome.mlp == (3, 0) and saved == pytest.approx(TABLE.block_ms["mlp"])  # not 3 × 0.01 ms


def test_the_latency_table_is_measured_on_this_machine():
    table = measure_latency_table(tiny_model(), seq_len=16, repeats=2)
    assert table.dense_ms > 0 and min(table.unit_ms.values()) >= 0 and min(table.block_ms.values()) >= 0
    assert table.setup["seq_len"] == 16 and table.saving("layer") == table.block_ms["attn"] + table.block_ms["mlp"]
