"""lm-eval scores of a candidate: the spec, the shaping of lm_eval's results, the store's scores and dense cache,
the harness on the micro model (its accuracy checked against our own log-likelihoods), and the job as the driver
runs it (in process, on a real Redis, with a kv_precision parent)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from darwinfront.core.methods import parse_spec
from darwinfront.core.status import JobStatus
from darwinfront.watch import format_front, format_scores
from service.schemas import Front
from workers import harness
from workers.evaluate_job import EvaluateJob, front_point
from workers.kv.cache import KVPrecisionConfig

pytest_plugins = ["service_fixtures"]

TASK = "darwinfront_pydoc_mc"
EVALUATE = {"method": "evaluate", "evaluate": {"job": "parent", "candidate": "c", "tasks": [TASK]}}

# what lm_eval 0.4's simple_evaluate returns (the parts `shape` reads), for two tasks
RESULTS = {
    "results": {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.02, "acc_norm,none": 0.3,
                     "acc_norm_stderr,none": 0.021, "sample_len": 100},
        "tiny": {"alias": "tiny", "acc,none": 1.0, "acc_stderr,none": "N/A"},
    },
    "higher_is_better": {"arc_easy": {"acc_norm": True, "acc": True}, "tiny": {"acc": True}},
    "n-samples": {"arc_easy": {"original": 2376, "effective": 100}, "tiny": {"original": 1, "effective": 1}},
    "n-shot": {"arc_easy": 0, "tiny": 5},
}


# ---- the spec -------------------------------------------------------------------------------------------------


def test_an_evaluate_spec_needs_no_model_and_plans_one_evaluation_per_task():
    spec = parse_spec({**EVALUATE, "evaluate": {**EVALUATE["evaluate"], "tasks": ["arc_easy", "piqa"]}})
    assert spec.model is None and spec.evaluate.limit is None and spec.evaluate.batch_size == 8
    assert spec.planned_evaluations() == 2


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"tasks": []}, ("evaluate", "tasks"), "at least 1"),
        ({"tasks": ["a b"]}, ("evaluate", "tasks", 0), "pattern"),
        ({"tasks": ["piqa", "piqa"]}, ("evaluate", "tasks"), "distinct"),
        ({"tasks": [TASK], "limit": 0}, ("evaluate", "limit"), "greater than or equal to 1"),
        ({"tasks": [TASK], "num_fewshot": -1}, ("evaluate", "num_fewshot"), "greater than or equal to 0"),
        ({"tasks": [TASK], "shots": 3}, ("evaluate", "shots"), "Extra inputs"),
    ],
)
def test_bad_evaluate_specs_name_the_field(options, field, words):
    with pytest.raises(ValidationError) as caught:
        parse_spec({**EVALUATE, "evaluate": {"job": "p", "candidate": "c", **options}})
    error = caught.value.errors()[0]
    assert error["loc"] == field and words in error["msg"]


def test_an_evaluate_spec_without_its_section_says_what_it_needs():
    with pytest.raises(ValidationError, match="Field required for method evaluate"):
        parse_spec({"method": "evaluate"})


# ---- shaping lm_eval's results ----------------------------------------------------------------------------------


def test_shape_takes_the_first_declared_metric_and_keeps_every_one():
    shaped = harness.shape(RESULTS)
    arc = shaped["arc_easy"]
    assert (arc["metric"], arc["value"], arc["stderr"]) == ("acc_norm", 0.3, 0.021)  # declared first
    assert arc["metrics"] == {"acc": {"value": 0.25, "stderr": 0.02}, "acc_norm": {"value": 0.3, "stderr": 0.021}}
    assert (arc["samples"], arc["num_fewshot"], arc["higher_is_better"]) == (100, 0, True)
    assert shaped["tiny"]["stderr"] is None and shaped["tiny"]["num_fewshot"] == 5  # "N/A" is no number
    json.dumps(shaped, allow_nan=False)  # the store writes it as strict JSON


def test_the_dense_score_goes_beside_the_candidate_s_under_the_same_metric():
    candidate = harness.shape(RESULTS)
    dense = harness.shape({**RESULTS, "results": {"arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.03,
                                                                "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.04}}})
    merged = harness.beside_dense(candidate, dense, job_id="e1", limit=100)
    assert merged["arc_easy"]["dense"] == {"value": 0.6, "stderr": 0.04}
    assert merged["arc_easy"]["delta"] == pytest.approx(0.3 - 0.6)
    assert merged["tiny"]["dense"] is None and merged["tiny"]["delta"] is None
    assert merged["arc_easy"]["job"] == "e1" and merged["arc_easy"]["limit"] == 100
    point = front_point("c", "p", merged)
    assert point["objectives"] == {"score": pytest.approx((0.3 + 1.0) / 2)} and point["scores"] is merged
    table = format_scores(merged)
    assert "acc_norm" in table and "0.3000 ± 0.0210" in table and "-0.3000" in table


def test_the_cache_key_changes_with_every_setting_that_changes_a_score():
    base = {"limit": 10, "num_fewshot": None, "seed": 0}
    key = harness.setting_key(TASK, "1.0", **base)
    assert key == harness.setting_key(TASK, "1.0", **base)
    others = [harness.setting_key("piqa", "1.0", **base), harness.setting_key(TASK, "2.0", **base),
              harness.setting_key(TASK, "1.0", **{**base, "limit": None}),
              harness.setting_key(TASK, "1.0", **{**base, "num_fewshot": 0}),
              harness.setting_key(TASK, "1.0", **{**base, "seed": 1})]
    assert len({key, *others}) == 6


def test_relative_data_files_are_read_beside_the_task_yaml(tmp_path):
    config = {"task": "t", "dataset_kwargs": {"data_files": {"test": "a.jsonl", "train": ["/abs/b.jsonl"]}}}
    fixed = harness._absolute_data_files(config, tmp_path)
    assert fixed["dataset_kwargs"]["data_files"] == {"test": str(tmp_path / "a.jsonl"), "train": ["/abs/b.jsonl"]}
    assert config["dataset_kwargs"]["data_files"]["test"] == "a.jsonl"  # the task's own config is left alone


# ---- the store ----------------------------------------------------------------------------------------------------


def test_scores_merge_per_task_and_show_on_the_front(store):
    job_id = store.create("alpha", {"model": {"source": "builtin:micro-llama"}}).id
    store.set_front(job_id, [{"candidate_id": "a", "objectives": {"kl": 0.1, "params": 5}},
                             {"candidate_id": "b", "objectives": {"kl": 0.2, "params": 3}}], objectives=[])
    first = {"piqa": {"metric": "acc", "value": 0.5}}
    assert store.merge_scores(job_id, "a", first) == first
    both = store.merge_scores(job_id, "a", {"arc_easy": {"metric": "acc", "value": 0.4},
                                            "piqa": {"metric": "acc", "value": 0.6}})
    assert both == {"piqa": {"metric": "acc", "value": 0.6}, "arc_easy": {"metric": "acc", "value": 0.4}}
    points = store.get_scored_front(job_id)["points"]
    assert points[0]["scores"] == both and "scores" not in points[1]
    assert "scores" not in store.get_front(job_id)["points"][0]  # the stored snapshot is unchanged
    table = format_front(Front(job_id=job_id, **{**store.get_scored_front(job_id), "objectives": [
        {"name": "kl", "direction": "minimize", "unit": "nats"},
        {"name": "params", "direction": "minimize", "unit": "parameters"}]}))
    assert "arc_easy" in table and "piqa" in table and "0.6000 (-)" in table


def test_the_dense_cache_is_per_parent_and_setting(store):
    assert store.get_dense_score("p", "k") is None
    store.put_dense_score("p", "k", {TASK: {"value": 0.5}})
    assert store.get_dense_score("p", "k") == {TASK: {"value": 0.5}}
    assert store.get_dense_score("p", "k2") is None and store.get_dense_score("q", "k") is None


# ---- the harness on the micro model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks():
    return harness.load_tasks([TASK])


def _our_accuracy(model, tokenizer, docs) -> tuple[float, float]:
    """acc and acc_norm of `docs` by our own forward: the sum of the choice tokens' log-probabilities after the
    question (lm_eval's rule: the continuation's tokens are those the whole string adds to the question's)."""
    right = right_norm = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"], add_special_tokens=False).input_ids
            whole = tokenizer(doc["question"] + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = F.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), dim=-1)  # (T-1, V)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += max(range(len(scores)), key=lambda i: (scores[i], -i)) == doc["answer"]
        norm = [s / len(c) for s, c in zip(scores, doc["choices"], strict=True)]
        right_norm += max(range(len(norm)), key=lambda i: (norm[i], -i)) == doc["answer"]
    return right / len(docs), right_norm / len(docs)


def test_lm_eval_scores_our_loaded_model_as_our_own_forward_does(micro_model, tasks):
    model, tokenizer = micro_model
    shaped = harness.score(harness.wrap(model, tokenizer, batch_size=4), tasks, [TASK], limit=12,
                           num_fewshot=None, seed=0)
    docs = [json.loads(line) for line in (harness.TASKS_DIR / "pydoc_mc.jsonl").read_text().splitlines()[:12]]
    acc, acc_norm = _our_accuracy(model, tokenizer, docs)
    entry = shaped[TASK]
    assert entry["samples"] == 12 and entry["metric"] == "acc"
    assert entry["value"] == pytest.approx(acc) and entry["metrics"]["acc_norm"]["value"] == pytest.approx(acc_norm)
    assert entry["stderr"] == pytest.approx((acc * (1 - acc) / 11) ** 0.5)  # lm_eval's sample standard error
    assert tasks.local == {TASK} and not tasks.generative(TASK)


def test_an_untouched_kv_cache_scores_as_the_model_and_two_bits_change_the_log_likelihoods(micro_model, tasks):
    model, tokenizer = micro_model
    layers = model.config.num_hidden_layers

    def loglikelihoods(kv_config) -> list[float]:
        lm = harness.wrap(model, tokenizer, batch_size=4, kv_config=kv_config)
        return [ll for ll, _ in lm.loglikelihood(requests[:8], disable_tqdm=True)]

    [task] = tasks.built[TASK]
    task.build_all_requests(limit=2, rank=0, world_size=1)
    requests = [r for instance in task.instances for r in [instance]]
    plain = loglikelihoods(None)
    untouched = loglikelihoods(KVPrecisionConfig(tuple((16, 16) for _ in range(layers)), "per_token", None, 0))
    two_bits = loglikelihoods(KVPrecisionConfig(tuple((2, 2) for _ in range(layers)), "per_token", None, 0))
    assert untouched == pytest.approx(plain, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(plain, two_bits, strict=True)) > 1e-3


# ---- the job, as the driver runs it ------------------------------------------------------------------------------


KV_PARENT = {"method": "kv_precision", "model": {"source": "builtin:micro-llama", "device": "cpu"},
             "kv": {"trials": 2}, "seed": 3}


@pytest.fixture
def kv_parent(store):
    """A finished kv_precision job holding two candidates: every layer at 16 bits (untouched) and at 2 bits."""
    parent_id = store.create("alpha", parse_spec(KV_PARENT).model_dump(mode="json")).id
    assert store.claim("test-driver", timeout=0) == parent_id
    for cid, bits in (("kv-16", 16), ("kv-2", 2)):
        store.put_result(parent_id, cid, {"candidate_id": cid, "mode": "per_token", "group_size": None,
                                          "residual": 0, "layers": [[bits, bits]] * 2, "metrics": {"kl": 0.0}})
    store.set_front(parent_id, [{"candidate_id": c, "objectives": {"kl": 0.0, "bits": b}}
                                for c, b in (("kv-16", 16), ("kv-2", 2))], objectives=[])
    store.set_status(parent_id, JobStatus.succeeded)

    def follow_up(candidate: str, **options) -> str:
        spec = {"method": "evaluate", "model": KV_PARENT["model"], "seed": 3,
                "evaluate": {"tasks": [TASK], "limit": 6, **options, "job": parent_id, "candidate": candidate}}
        job_id = store.create("alpha", parse_spec(spec).model_dump(mode="json")).id
        while store.claim("test-driver", timeout=0) != job_id:
            pass
        return job_id

    return parent_id, follow_up


def test_the_dense_model_is_scored_once_per_parent_and_the_scores_land_on_its_front(store, kv_parent, tmp_path):
    parent_id, follow_up = kv_parent
    first = follow_up("kv-16")
    EvaluateJob(store, first, data_dir=tmp_path, in_process=True).run()
    second = follow_up("kv-2")
    EvaluateJob(store, second, data_dir=tmp_path, in_process=True).run()

    prepared = [next(e["data"] for e in store.events(j) if e["kind"] == "prepared") for j in (first, second)]
    assert (prepared[0]["dense_to_score"], prepared[1]["dense_to_score"]) == ([TASK], [])
    assert prepared[1]["dense_cached"] == [TASK]
    assert [e["data"]["model"] for e in store.events(second) if e["kind"] == "scored"] == ["candidate"]
    untouched, two_bits = (store.get_result(j, c)["evaluation"]["scores"][TASK] for j, c in
                           ((first, "kv-16"), (second, "kv-2")))
    assert untouched["value"] == untouched["dense"]["value"] and untouched["delta"] == 0.0
    assert two_bits["dense"] == untouched["dense"] and two_bits["samples"] == 6 and two_bits["job"] == second
    points = {p["candidate_id"]: p for p in store.get_scored_front(parent_id)["points"]}
    assert points["kv-16"]["scores"][TASK] == untouched and points["kv-2"]["scores"][TASK] == two_bits
    [own] = store.get_front(second)["points"]
    assert own["objectives"] == {"score": two_bits["value"]} and own["parent_job"] == parent_id
    assert store.get(second).progress["evaluations"] == store.get(second).progress["planned"] == 1


def test_a_generation_task_is_refused_for_a_kv_candidate(store, kv_parent, tmp_path, monkeypatch):
    parent_id, follow_up = kv_parent
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "echo.jsonl").write_text(json.dumps({"q": "Say def:", "a": " def"}) + "\n")
    (folder / "echo.yaml").write_text(
        "task: tmp_echo\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: echo.jsonl\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: exact_match\n")
    monkeypatch.setenv(harness.TASKS_ENV, str(folder))
    job_id = follow_up("kv-2", tasks=["tmp_echo"])
    with pytest.raises(harness.InvalidSpec, match="tmp_echo generate text.*log-likelihood tasks only"):
        EvaluateJob(store, job_id, data_dir=tmp_path, in_process=True).run()
    assert store.get_scores(parent_id) == {}


def test_a_cancel_stops_the_job_before_its_next_task_and_writes_no_scores(store, kv_parent, tmp_path):
    from workers.job import Cancelled

    parent_id, follow_up = kv_parent
    job_id = follow_up("kv-2")
    store.request_cancel(job_id)
    with pytest.raises(Cancelled):
        EvaluateJob(store, job_id, data_dir=tmp_path, in_process=True).run()
    assert store.get_scores(parent_id) == {} and store.get_front(job_id)["points"] == []


def test_a_post_trained_candidate_without_its_archive_here_is_refused_saying_where_to_run(store, tmp_path):
    prune = {"model": {"source": "builtin:micro-llama", "device": "cpu"}}
    posttrain = {"method": "posttrain", "model": prune["model"], "posttrain": {"job": "p", "candidate": "c"}}
    parent_id = store.create("alpha", parse_spec(posttrain).model_dump(mode="json")).id
    assert store.claim("test-driver", timeout=0) == parent_id
    store.put_result(parent_id, "c", {"candidate_id": "c", "parameters": 10})
    store.set_status(parent_id, JobStatus.succeeded)
    spec = {"method": "evaluate", "model": prune["model"], "evaluate": {"job": parent_id, "candidate": "c",
                                                                        "tasks": [TASK]}}
    job_id = store.create("alpha", parse_spec(spec).model_dump(mode="json")).id
    assert store.claim("test-driver", timeout=0) == job_id
    with pytest.raises(harness.InvalidSpec, match="not on this host.*where the posttrain job ran"):
        EvaluateJob(store, job_id, data_dir=tmp_path, in_process=True).run()
