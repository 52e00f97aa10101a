"""An obs level database shared out layer by layer: helpers' layers come back and the database is the same."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from workers import database, levels
from workers.criteria.obs import iter_obs_levels


class InProcessHelpers:
    """`database.LayerHelpers` computing the helpers' shares in this process, one share per `poll`."""

    def __init__(self, model, calibration, table, count):
        self.model, self.calibration, self.table, self.count = model, calibration, table, count
        self.shares: list[list[int]] = []
        self.polls = 0

    def _results(self, share):
        counts = {kind: self.table.counts(kind) for kind in database.KINDS}
        return list(iter_obs_levels(self.model, self.calibration, counts, attention_unit=self.table.attention_unit,
                                    layers=share))

    def start(self, shares):
        self.shares = [list(s) for s in shares]

    def poll(self):
        self.polls += 1
        return self._results(self.shares.pop(0)) if self.shares else []

    def drain(self):
        while self.shares:
            yield from self._results(self.shares.pop(0))


def _same_database(a: database.LevelDatabase, b: database.LevelDatabase) -> None:
    assert a.key == b.key and a.orders == b.orders
    for layer in range(a.n_layers):
        for kind in database.KINDS:
            for level in range(1, a.table.top(kind) + 1):
                assert torch.equal(load_file(a.weight_path(layer, kind, level))["weight"],
                                   load_file(b.weight_path(layer, kind, level))["weight"])


def test_a_database_built_with_helpers_equals_one_built_alone(tmp_path):
    torch.set_num_threads(1)
    model = tiny_model("llama_gqa")
    calibration = torch.randint(model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    table = levels.table_for(model, levels=6, multiple=8)
    alone = database.build(model, calibration, criterion="obs", table=table, root=tmp_path / "alone")
    seen = []
    helpers = InProcessHelpers(model, calibration, table, count=2)
    shared = database.build(model, calibration, criterion="obs", table=table, root=tmp_path / "shared",
                            helpers=helpers, on_layer=lambda done, total: seen.append((done, total)))
    assert shared.built and helpers.polls == 1 and not helpers.shares  # layer 0 here, layers 1 and 2 there
    assert seen == [(1, 3), (2, 3), (3, 3)]
    _same_database(alone, shared)


def test_a_helper_that_returns_too_little_fails_the_build(tmp_path):
    model = tiny_model("llama_gqa")
    calibration = torch.randint(model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    table = levels.table_for(model, levels=6, multiple=8)

    class Lazy(InProcessHelpers):
        def drain(self):
            return iter(())

        def poll(self):
            return []

    with pytest.raises(RuntimeError, match="lacks layers"):
        database.build(model, calibration, criterion="obs", table=table, root=tmp_path,
                       helpers=Lazy(model, calibration, table, count=1))
    assert not list(tmp_path.glob("obs-*/index.json"))  # nothing half-built left as a database


@pytest.mark.integration
def test_prepare_shares_an_obs_database_with_a_ray_helper(micro_dir, tmp_path, monkeypatch):
    import ray

    from workers.pool import RemoteLayers, init_ray
    from workers.prepare import prepare

    spec = {"model": {"source": str(micro_dir), "device": "cpu"},
            "data": {"calibration_tokens": 256, "train_tokens": 256, "database_tokens": 512, "eval_tokens": 256,
                     "seq_len": 64},
            "prune": {"criterion": "obs", "levels": 4}, "resources": {"evaluators": 2}}
    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path / "alone"))
    alone = prepare(spec)
    init_ray(num_cpus=2)
    try:
        monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path / "shared"))
        shared = prepare(spec, helpers=RemoteLayers(spec, 1, threads=1))
    finally:
        ray.shutdown()
    assert alone["database"]["built"] and shared["database"]["built"]
    _same_database(database.LevelDatabase.open(alone["database"]["directory"]),
                   database.LevelDatabase.open(shared["database"]["directory"]))
