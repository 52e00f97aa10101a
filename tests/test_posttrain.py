"""Post-training a chosen candidate: the spec, the training batches, the trainer on the micro model, and the
job as the driver runs it (in process, on a real Redis)."""

from __future__ import annotations

import shutil
import tarfile
import threading
import time

import pytest
import torch
from pydantic import ValidationError

from darwinfront.core.methods import parse_spec
from darwinfront.core.status import JobStatus
from search.genome import LevelSpace
from workers import artifacts, slicing
from workers.job import Cancelled, LeaseLost
from workers.posttrain_job import Posttrainer, PosttrainJob, batch_rows, load_pools

pytest_plugins = ["service_fixtures"]

CANDIDATE = "t0-g0-c0"
PARENT_SPEC = {
    "model": {"source": "builtin:micro-llama", "device": "cpu"},
    "data": {"calibration_tokens": 512, "train_tokens": 1024, "database_tokens": 512, "eval_tokens": 512,
             "seq_len": 64},
    "prune": {"targets": [0.5], "criterion": "wanda_sp", "levels": 4, "train_lr": 1e-3},
    "search": {"generations": 1, "offspring": 2},
    "seed": 1,
}
OPTIONS = {"tokens": 4096, "lr": 1e-3, "batch_size": 8, "loss": "kd", "seed": 0}
POSTTRAIN = {"method": "posttrain", "posttrain": {"job": "parent", "candidate": CANDIDATE}}


# ---- the spec -------------------------------------------------------------------------------------------------


def test_a_posttrain_spec_needs_no_model_and_plans_one_evaluation():
    spec = parse_spec(POSTTRAIN)
    assert spec.model is None and not hasattr(spec, "prune") and not hasattr(spec, "search")
    assert spec.posttrain.loss == "kd" and spec.posttrain.tokens == 4 * 32768  # 4x the last stage's training
    assert spec.planned_evaluations() == 1


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"posttrain": {"job": "p", "candidate": "c", "tokens": 0}}, ("posttrain", "tokens"), "greater than"),
        ({"posttrain": {"job": "p", "candidate": "c", "tokens": 10**10}}, ("posttrain", "tokens"), "less than"),
        ({"posttrain": {"job": "p", "candidate": "c", "lr": 0}}, ("posttrain", "lr"), "greater than 0"),
        ({"posttrain": {"job": "p", "candidate": "c", "batch_size": 0}}, ("posttrain", "batch_size"), "greater"),
        ({"posttrain": {"job": "p", "candidate": "c", "loss": "mse"}}, ("posttrain", "loss"), "'kd' or 'ce'"),
        ({"posttrain": {"job": "p", "candidate": "c", "epochs": 3}}, ("posttrain", "epochs"), "Extra inputs"),
        ({"posttrain": {"job": "p/../x", "candidate": "c"}}, ("posttrain", "job"), "pattern"),
        ({"posttrain": {"candidate": "c"}}, ("posttrain", "job"), "Field required"),
        ({"posttrain": None}, ("posttrain",), "Field required for method posttrain"),
        ({"prune": {"targets": [0.5]}}, ("prune",), "does not apply to method posttrain"),
        ({"search": {"generations": 1}}, ("search",), "does not apply to method posttrain"),
        ({"kv": {}}, ("kv",), "does not apply to method posttrain"),
        ({"posttrain": {"job": "p", "candidate": "c", "serene": {"strength": 1.5}}}, ("posttrain", "serene",
                                                                                      "strength"), "less than 1"),
        ({"posttrain": {"job": "p", "candidate": "c", "serene": {"cut": -0.1}}}, ("posttrain", "serene", "cut"),
         "greater than or equal to 0"),
        ({"posttrain": {"job": "p", "candidate": "c", "loss": "ce", "block_distill": {}}},
         ("posttrain", "block_distill"), "needs loss kd"),
        ({"posttrain": {"job": "p", "candidate": "c", "block_distill": {"cap": 0.5}}},
         ("posttrain", "block_distill", "cap"), "greater than or equal to 1"),
    ],
)
def test_bad_posttrain_specs_name_the_field(changes, field, words):
    with pytest.raises(ValidationError) as caught:
        parse_spec({**POSTTRAIN, **changes})
    error = caught.value.errors()[0]
    assert error["loc"] == field and words in error["msg"]


@pytest.mark.parametrize("method", ["structured_prune", "kv_precision"])
def test_other_methods_refuse_a_posttrain_section_and_still_need_a_model(method):
    with pytest.raises(ValidationError) as caught:
        parse_spec({"method": method, "model": {"source": "builtin:micro-llama"},
                                "posttrain": {"job": "p", "candidate": "c"}})
    assert caught.value.errors()[0]["loc"] == ("posttrain",)
    with pytest.raises(ValidationError) as caught:
        parse_spec({"method": method})
    assert [(e["loc"], e["msg"]) for e in caught.value.errors()] == [(("model",), "Field required")]


# ---- the batches ----------------------------------------------------------------------------------------------


def test_batch_rows_cover_the_budget_and_reshuffle_beyond_the_pool():
    batches = batch_rows(5, tokens=4 * 12 - 1, seq_len=4, seed=3, batch_size=5)  # rounds up to 12 sequences
    assert [len(b) for b in batches] == [5, 5, 2]
    rows = torch.cat(batches).tolist()
    assert sorted(rows[:5]) == sorted(rows[5:10]) == list(range(5))  # each pass is a permutation of the pool
    assert rows[:5] != rows[5:10]
    again = batch_rows(5, tokens=47, seq_len=4, seed=3, batch_size=5)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert torch.cat(batch_rows(5, tokens=47, seq_len=4, seed=4, batch_size=5)).tolist() != rows


def test_the_training_pool_is_disjoint_from_the_fitness_pool_and_the_held_out_text(micro_model):
    _, tokenizer = micro_model
    spec = parse_spec(PARENT_SPEC)
    pools = load_pools(spec, tokenizer, tokens=8192)
    assert pools.calibration.shape == (spec.data.calibration_sequences, 64) and pools.training.shape == (128, 64)
    fitness = {tuple(r) for r in pools.calibration.tolist()}
    held_out = {tuple(r) for r in pools.held_out.tolist()}
    training = {tuple(r) for r in pools.training.tolist()}
    assert not training & fitness and not training & held_out


# ---- the trainer ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parent(tmp_path_factory, micro_dir):
    """A lightly trained candidate of a micro-llama prune job: its configuration and exported archive."""
    from workers.evaluator import Evaluator
    from workers.prepare import prepare

    spec = parse_spec(PARENT_SPEC).model_dump(mode="json")
    prepared = prepare(spec)
    evaluator = Evaluator(spec, prepared)
    genome = LevelSpace.from_dict(prepared["space"]).uniform(0.5)
    result = {"candidate_id": CANDIDATE, "target": 0.5, "kl": 0.1}
    configuration = evaluator.configuration({"genome": genome.to_dict(), "seed": 5, "train_tokens": 256}, result)
    data_dir = tmp_path_factory.mktemp("parent")
    evaluator.export(configuration, str(data_dir / "export"))
    meta = artifacts.archive(data_dir, "parent", CANDIDATE, data_dir / "export")
    return {"spec": spec, "configuration": configuration, "data_dir": data_dir, "meta": meta,
            "archive": str(data_dir / "artifacts" / meta["path"])}


def _trainer(parent, archive="archive", **options) -> Posttrainer:
    archive = parent["archive"] if archive == "archive" else archive
    return Posttrainer(parent["spec"], parent["configuration"], archive, {**OPTIONS, **options})


def _run(trainer: Posttrainer) -> list[dict]:
    return [trainer.step() for _ in range(trainer.describe()["steps"])]


def _shapes(model) -> dict:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_training_keeps_the_sliced_shapes_and_lowers_the_kl(parent):
    trainer = _trainer(parent)
    plan = trainer.describe()
    assert plan["start"] == "archive" and plan["steps"] == 8 and plan["tokens"] == 4096
    assert plan["parameters"] == parent["configuration"]["parameters"] < plan["dense_parameters"]
    shapes = _shapes(trainer.model)
    before = trainer.measure()
    steps = _run(trainer)
    after = trainer.measure()
    assert [s["step"] for s in steps] == list(range(1, 9)) and steps[-1]["tokens"] == 4096
    assert _shapes(trainer.model) == shapes
    assert slicing.count_parameters(trainer.model) == parent["configuration"]["parameters"]
    assert after["held_out_kl"] < before["held_out_kl"] and after["kl"] < before["kl"]
    assert after["perplexity"] < before["perplexity"]
    with pytest.raises(RuntimeError, match="all 8 steps are done"):
        trainer.step()


def test_the_archive_and_the_rebuilt_export_start_from_the_same_weights(parent):
    loaded, rebuilt = _trainer(parent), _trainer(parent, archive=None)
    assert rebuilt.source == "rebuilt"
    want = loaded.model.state_dict()
    got = rebuilt.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(parent):
    first, second = _trainer(parent, tokens=1024), _trainer(parent, tokens=1024)
    other = _trainer(parent, tokens=1024, seed=1)
    for trainer in (first, second, other):
        _run(trainer)
    a, b, c = (t.model.state_dict() for t in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cross_entropy_training_lowers_the_perplexity(parent):
    trainer = _trainer(parent, loss="ce")
    assert trainer.dense is None  # no teacher needed while training
    before = trainer.measure()["perplexity"]
    _run(trainer)
    assert trainer.measure()["perplexity"] < before


# ---- the job, as the driver runs it ------------------------------------------------------------------------------


@pytest.fixture
def jobs(store, parent, tmp_path):
    """A finished parent job holding the candidate (its archive in the data dir) and a claimed follow-up job."""
    data_dir = tmp_path / "data"
    folder = data_dir / "artifacts"
    folder.mkdir(parents=True)
    parent_id = store.create("alpha", parent["spec"]).id
    assert store.claim("test-driver", timeout=0) == parent_id
    (folder / parent_id).mkdir()
    shutil.copy(parent["archive"], folder / parent_id / f"{CANDIDATE}.tar.gz")
    store.put_result(parent_id, CANDIDATE, parent["configuration"])
    store.put_artifact(parent_id, CANDIDATE, {**parent["meta"], "path": f"{parent_id}/{CANDIDATE}.tar.gz"})
    store.set_status(parent_id, JobStatus.succeeded)

    def follow_up(**options) -> str:
        spec = {"method": "posttrain", "model": parent["spec"]["model"], "data": parent["spec"]["data"],
                "seed": parent["spec"]["seed"],
                "posttrain": {**OPTIONS, **options, "job": parent_id, "candidate": CANDIDATE}}
        job_id = store.create("alpha", parse_spec(spec).model_dump(mode="json")).id
        assert store.claim("test-driver", timeout=0) == job_id
        return job_id

    return {"parent": parent_id, "follow_up": follow_up, "data_dir": data_dir}


def test_the_job_stores_a_result_an_archive_and_a_front_under_the_candidate_id(store, jobs, parent, tmp_path):
    job_id = jobs["follow_up"]()
    parent_before = (store.get(jobs["parent"]), store.get_result(jobs["parent"], CANDIDATE))
    PosttrainJob(store, job_id, data_dir=jobs["data_dir"], in_process=True).run()

    document = store.get_result(job_id, CANDIDATE)
    post = document["posttrain"]
    assert post["job"] == jobs["parent"] and post["start"] == "archive"
    assert (post["tokens"], post["steps"], post["loss"], post["lr"]) == (4096, 8, "kd", 1e-3)
    assert post["after"]["kl"] < post["before"]["kl"] and document["metrics"] == post["after"]
    assert document["weights"] == "posttrained"
    assert document["layers"] == parent["configuration"]["layers"]
    assert document["parameters"] == parent["configuration"]["parameters"]

    [point] = store.get_front(job_id)["points"]
    assert point["candidate_id"] == CANDIDATE and point["objectives"] == {"kl": post["after"]["kl"],
                                                                          "params": document["parameters"]}
    events = store.events(job_id)
    kinds = [e["kind"] for e in events]
    assert "prepared" in kinds and kinds.count("training") == 8 and kinds[-1] == "posttrained"
    progress = store.get(job_id).progress
    assert {k: progress[k] for k in ("step", "steps", "tokens", "evaluations", "planned")} == {
        "step": 8, "steps": 8, "tokens": 4096, "evaluations": 8, "planned": 8}

    meta = store.get_artifact(job_id, CANDIDATE)
    with tarfile.open(jobs["data_dir"] / "artifacts" / meta["path"]) as archive:
        archive.extractall(tmp_path / "out", filter="data")
    model, _ = slicing.load_pruned(tmp_path / "out" / CANDIDATE)
    assert slicing.count_parameters(model) == document["parameters"]
    assert (store.get(jobs["parent"]), store.get_result(jobs["parent"], CANDIDATE)) == parent_before


def test_cancel_and_a_lost_lease_stop_the_training_between_steps(store, jobs):
    job_id = jobs["follow_up"](tokens=64 * 64, batch_size=1)  # 64 steps

    def cancel_after_two_steps() -> None:
        deadline = time.monotonic() + 120
        while store.get(job_id).progress.get("step", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        store.request_cancel(job_id)

    canceller = threading.Thread(target=cancel_after_two_steps)
    canceller.start()
    with pytest.raises(Cancelled):
        PosttrainJob(store, job_id, data_dir=jobs["data_dir"], in_process=True).run()
    canceller.join()
    assert 2 <= store.get(job_id).progress["step"] < 64
    assert store.result_ids(job_id) == []

    lost = threading.Event()
    lost.set()
    job_id = jobs["follow_up"]()
    with pytest.raises(LeaseLost):
        PosttrainJob(store, job_id, data_dir=jobs["data_dir"], lease_lost=lost, in_process=True).run()
    assert store.get(job_id).progress == {}


def test_serene_adds_its_follow_up_cut_as_a_second_front_point(store, jobs, parent, tmp_path):
    job_id = jobs["follow_up"](serene={"strength": 0.3, "threshold": 1.0, "cut": 0.5})
    PosttrainJob(store, job_id, data_dir=jobs["data_dir"], in_process=True).run()
    trained = store.get_result(job_id, CANDIDATE)
    cut_id = f"{CANDIDATE}.serene-cut"
    cut = store.get_result(job_id, cut_id)
    assert trained["posttrain"]["serene"] == {"strength": 0.3, "threshold": 1.0, "cut": 0.5}
    assert cut["serene_cut"]["from"] == CANDIDATE and sum(cut["serene_cut"]["removed"].values()) > 0
    assert cut["parameters"] < trained["parameters"] == parent["configuration"]["parameters"]
    assert cut["posttrain"]["before"] == trained["posttrain"]["after"]
    points = {p["candidate_id"]: p for p in store.get_front(job_id)["points"]}
    assert set(points) == {CANDIDATE, cut_id}
    assert points[cut_id]["objectives"] == {"kl": cut["metrics"]["kl"], "params": cut["parameters"]}
    meta = store.get_artifact(job_id, cut_id)
    with tarfile.open(jobs["data_dir"] / "artifacts" / meta["path"]) as archive:
        archive.extractall(tmp_path / "out", filter="data")
    model, _ = slicing.load_pruned(tmp_path / "out" / cut_id)
    assert slicing.count_parameters(model) == cut["parameters"]
    from workers import modeling

    dense, _ = modeling.load_model(parent["spec"]["model"]["source"], dtype="float32", device="cpu")
    assert slicing.count_parameters(slicing.apply_configuration(dense, cut)) == cut["parameters"]


def test_block_distillation_trains_each_block_at_a_rate_inverse_to_its_sensitivity(parent):
    from workers import block_distill

    trainer = _trainer(parent, block_distill={"freeze_early": 1, "cap": 4.0, "sequences": 4})
    plan = trainer.describe()
    s = torch.tensor(plan["block_sensitivities"], dtype=torch.float64)
    want = block_distill.block_weights(s, cap=4.0, freeze_early=1)
    assert plan["block_weights"] == want.tolist() and want[0] == 0 and (want[1:] > 0).all()
    assert torch.equal(s, block_distill.block_sensitivities(trainer.model, trainer.calibration[:4]))
    rates = sorted(g["lr"] for g in trainer.optimizer.param_groups)
    assert rates == sorted([OPTIONS["lr"] * w for w in want.tolist()] + [OPTIONS["lr"]])
    first = [p.detach().clone() for p in trainer.model.model.layers[0].parameters()]
    _run(trainer)
    assert all(torch.equal(a, b) for a, b in zip(first, trainer.model.model.layers[0].parameters(), strict=True))
