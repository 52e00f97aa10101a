"""The KV precision search space: Pareto pruning, DBSCAN, grouping, expansion. Pure Python, no torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from darwinfront.core.errors import InvalidSpec
from search.kv_space import (
    ALL_PAIRS,
    PRESETS,
    KVGroup,
    KVSpace,
    build_space,
    dbscan,
    equivalent_bits,
    pair_name,
    pareto_pairs,
    preset,
)

# KVTuner Table 3: Llama-3.1-8B-Instruct, per-token-asym, e_o averaged over layers.
TABLE3 = {(8, 8): 0.014, (8, 4): 0.100, (8, 2): 0.401, (4, 8): 0.168, (4, 4): 0.207, (4, 2): 0.453,
          (2, 8): 0.882, (2, 4): 0.892, (2, 2): 0.962}
KEY_FIRST = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2)]


def test_search_space_module_does_not_import_torch():
    code = "import sys, search.kv_space; assert not {'torch', 'ray', 'redis'} & set(sys.modules), 'heavy import'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_pair_vocabulary():
    assert len(ALL_PAIRS) == 9 and ALL_PAIRS[0] == (8, 8) and ALL_PAIRS[-1] == (2, 2)
    assert [pair_name(p) for p in KEY_FIRST] == ["KV8", "K8V4", "KV4", "K4V2", "KV2"] == list(PRESETS)
    assert [equivalent_bits(p) for p in KEY_FIRST] == [8, 6, 4, 3, 2]
    assert preset("K4V2", 3) == [[4, 2], [4, 2], [4, 2]]
    with pytest.raises(InvalidSpec, match="'KV3' is not one of"):
        preset("KV3", 3)


def test_pareto_of_table3_is_the_key_first_ladder():
    assert pareto_pairs([(k, v, e) for (k, v), e in TABLE3.items()]) == KEY_FIRST


def test_pareto_keeps_ties_and_drops_dominated():
    entries = [(8, 8, 0.1), (8, 4, 0.2), (4, 8, 0.2), (4, 4, 0.2), (2, 2, 0.05)]
    # KV2 has the fewest bits and the least error: it dominates everything else.
    assert pareto_pairs(entries) == [(2, 2)]
    assert pareto_pairs(entries[:3]) == [(8, 8), (8, 4), (4, 8)]  # equal bits and error: both kept


def test_dbscan_known_labels():
    points = [[0.0], [0.1], [5.0], [5.05], [9.0]]
    assert dbscan(points, eps=0.2, min_samples=2) == [0, 0, 1, 1, -1]
    assert dbscan(points, eps=0.2, min_samples=3) == [-1] * 5
    # A chain joins through core points: 0 - 1 - 2 - 3 with steps of 1.
    assert dbscan([[0], [1], [2], [3], [10]], eps=1.0) == [0, 0, 0, 0, -1]


def test_dbscan_border_points_join_but_do_not_spread():
    # min_samples=3: only point 1 (neighbours 0, 1, 2) is a core point; 0 and 2 join its cluster as border
    # points, and 3.5 (1.5 away from 2) stays noise because border point 2 does not spread the cluster.
    assert dbscan([[0.0], [1.0], [2.0], [3.5]], eps=1.0, min_samples=3) == [0, 0, 0, -1]
    # With 3.0 instead, point 2 has neighbours 1, 2, 3: it is a core point too and takes 3 in.
    assert dbscan([[0.0], [1.0], [2.0], [3.0]], eps=1.0, min_samples=3) == [0, 0, 0, 0]


def _table(rows: dict[int, dict[tuple[int, int], float]]) -> dict:
    return {"layers": [{"layer": layer, "pairs": [{"k": k, "v": v, "e_o": e} for (k, v), e in errs.items()]}
                       for layer, errs in rows.items()]}


def _scaled(factor: float) -> dict[tuple[int, int], float]:
    return {p: e * factor for p, e in TABLE3.items()}


def test_build_space_groups_by_candidates_then_clusters():
    value_first = {p: e for p, e in TABLE3.items()}
    value_first[(4, 8)], value_first[(8, 4)] = 0.05, 0.168  # K4V8 beats K8V4 on this layer
    rows = {0: _scaled(1.0), 1: _scaled(1.02), 2: value_first, 3: _scaled(0.3), 4: _scaled(0.31), 5: _scaled(2.0)}
    space = build_space(_table(rows), eps=0.05)
    assert space.to_dict()["groups"] == [
        {"layers": [0, 1], "candidates": [list(p) for p in KEY_FIRST]},
        {"layers": [2], "candidates": [[8, 8], [4, 8], [4, 4], [4, 2], [2, 2]]},
        {"layers": [3, 4], "candidates": [list(p) for p in KEY_FIRST]},
        {"layers": [5], "candidates": [list(p) for p in KEY_FIRST]},  # DBSCAN noise: its own group
    ]
    assert space.size() == 5**4
    assert build_space(_table({0: _scaled(1.0), 1: _scaled(1.5)}), eps=0.05).num_layers == 2


def test_expand_and_bits():
    space = KVSpace(groups=(KVGroup((0, 2), tuple(KEY_FIRST)), KVGroup((1,), ((8, 8), (2, 2)))), num_layers=3)
    assert space.expand([3, 1]) == [[4, 2], [2, 2], [4, 2]]
    assert space.nominal_bits([3, 1]) == pytest.approx((6 + 4 + 6) / 6)
    assert space.uniform_choice("KV8") == [0, 0]
    with pytest.raises(InvalidSpec, match=r"K8V4 was pruned from the candidates of layers \[\[1\]\]"):
        space.uniform_choice("K8V4")
    with pytest.raises(InvalidSpec, match="index 2 outside 0..1"):
        space.expand([0, 2])
    with pytest.raises(InvalidSpec, match="1 indices given for 2 groups"):
        space.expand([0])
    assert KVSpace.from_dict(space.to_dict()) == space


def test_groups_must_partition_the_layers():
    with pytest.raises(InvalidSpec, match="partition"):  # layer 1 in two groups (KVTuner's data has such overlaps)
        KVSpace(groups=(KVGroup((0, 1), ((8, 8),)), KVGroup((1, 2), ((8, 8),))), num_layers=3)
    with pytest.raises(InvalidSpec, match="partition"):
        KVSpace(groups=(KVGroup((0,), ((8, 8),)),), num_layers=2)
    with pytest.raises(InvalidSpec, match="no candidate"):
        KVSpace(groups=(KVGroup((0,), ()),), num_layers=1)
