"""Progress before the first generation: each prepare step, and the obs database layer by layer, reach the store."""

from __future__ import annotations

import pickle

import pytest

from darwinfront.watch import describe_progress
from workers import progress
from workers.progress import StepReport

pytest_plugins = ["service_fixtures"]


def test_eta_and_durations_read_as_people_read_them():
    assert progress.eta(0, 30, 10.0) is None
    assert progress.eta(12, 30, 24.0) == pytest.approx(36.0)
    assert progress.eta(30, 30, 60.0) == 0.0
    assert progress.format_seconds(40) == "40 s"
    assert progress.format_seconds(210) == "3.5 min"
    assert progress.format_seconds(4 * 3600) == "4.0 h"


def test_a_report_writes_progress_and_an_event_and_survives_pickling(store, redis_server):
    job_id = store.create("t", {"model": {"source": "builtin:micro-llama"}}).id
    report = pickle.loads(pickle.dumps(StepReport(redis_server.url, job_id)))  # as Ray sends it
    assert report._store is None
    report("model", "loading the model")
    tick = report.counter("database", "layers")
    tick(1, 4)
    tick(4, 4)
    got = store.get(job_id).progress
    assert got["phase"] == "prepare" and got["step"] == "database" and (got["done"], got["total"]) == (4, 4)
    assert got["message"] == "database 4/4 layers"  # nothing left: no ETA in the words
    events = [e["data"] for e in store.events(job_id) if e["kind"] == "prepare"]
    assert [e["message"].split(",")[0] for e in events] == ["loading the model", "database 1/4 layers",
                                                            "database 4/4 layers"]
    assert events[1]["eta_seconds"] >= 0.0 and events[1]["message"].endswith(" left")


def test_a_report_without_redis_only_logs(caplog):
    with caplog.at_level("INFO", logger="workers.progress"):
        reported = StepReport()("dense", "scoring the dense model")
    assert reported["message"] == "scoring the dense model" and "scoring the dense model" in caplog.text


def test_an_unreachable_redis_does_not_fail_the_step():
    report = StepReport("redis://127.0.0.1:1/0", "job")
    assert report("model", "loading")["step"] == "model"


def test_the_bar_label_shows_the_prepare_step_then_the_generation():
    assert describe_progress("running", {}) == "running gen -"
    prepare = {"phase": "prepare", "step": "database", "message": "database 12/30 layers, 40 s left"}
    assert describe_progress("running", prepare) == "running: database 12/30 layers, 40 s left"
    search = {"phase": "search", "generation": 3, "generations": 10, "message": "running generation 3"}
    assert describe_progress("running", search) == "running gen 3/10"


def test_prepare_reports_every_obs_database_layer_then_finds_it_in_the_cache(
    store, redis_server, micro_dir, tmp_path, monkeypatch
):
    from workers.prepare import prepare

    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path))  # a database of our own, built here
    spec = {"model": {"source": str(micro_dir), "device": "cpu"},
            "data": {"calibration_tokens": 256, "train_tokens": 256, "database_tokens": 512, "eval_tokens": 256,
                     "seq_len": 64},
            "prune": {"criterion": "obs", "levels": 4}}
    job_id = store.create("t", spec).id
    prepared = prepare(spec, StepReport(redis_server.url, job_id))
    assert prepared["database"]["built"]
    events = [e["data"] for e in store.events(job_id) if e["kind"] == "prepare"]
    steps = [e["step"] for e in events]
    assert steps[0] == "model" and steps[-1] == "dense" and "database" in steps
    layers = [(e["done"], e["total"]) for e in events if "done" in e]
    n = prepared["space"]["n_layers"]
    assert layers == [(i, n) for i in range(1, n + 1)]
    assert any("obs level database" in e["message"] and " built in " in e["message"] for e in events)

    again = store.create("t", spec).id
    assert not prepare(spec, StepReport(redis_server.url, again))["database"]["built"]
    messages = [e["data"]["message"] for e in store.events(again) if e["kind"] == "prepare"]
    assert any("found in the cache" in m for m in messages)
    assert not any("layers" in m for m in messages)
