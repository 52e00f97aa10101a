"""The joint spec: its sections, the memory cap as bytes or a size string, and what it refuses (naming the field)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from darwinfront.core import methods
from darwinfront.core.joint_spec import parse_bytes
from darwinfront.core.methods import parse_spec
from darwinfront.watch import describe_deployment

BASE = {"method": "joint", "model": {"source": "builtin:tiny-llama"}}


def test_sizes():
    assert parse_bytes("6GiB") == 6 * 2**30
    assert parse_bytes("512 MB") == 512 * 10**6
    assert parse_bytes("1.5kib") == 1536
    assert parse_bytes(1234) == 1234
    for bad in ("6 parsecs", "", "-1GiB", True, 0, 2.5):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_defaults_round_trip_and_are_registered():
    spec = parse_spec({**BASE, "joint": {"memory_cap": "6GiB"}, "deployment": {"batch_size": 4, "context": 32768}})
    assert spec.joint.memory_cap == 6 * 2**30 and spec.prune.training_aware is False
    assert spec.planned_evaluations() == spec.joint.evaluations
    assert parse_spec(spec.model_dump(mode="json")) == spec
    assert [o.name for o in methods.get("joint").objectives] == ["kl", "memory"]
    assert describe_deployment(spec.model_dump(mode="json")).startswith("memory at batch 4 x 32,768 tokens")
    assert describe_deployment({"method": "kv_precision"}) is None


@pytest.mark.parametrize(("section", "field"), [
    ({"joint": {"memory_cap": "6 parsecs"}}, "joint.memory_cap"),
    ({"joint": {"seed_jobs": ["no/slash"]}}, "joint.seed_jobs.0"),
    ({"deployment": {"context": 0}}, "deployment.context"),
    ({"deployment": {"dtype": "int4"}}, "deployment.dtype"),
    ({"search": {"generations": 3}}, "search"),  # the prune job's section
])
def test_bad_fields_are_named(section, field):
    with pytest.raises(ValidationError) as info:
        parse_spec({**BASE, **section})
    assert field in {".".join(map(str, e["loc"])) for e in info.value.errors()}


@pytest.mark.parametrize("section", [{"prune": {"training_aware": True}}, {"kv": {"trials": 5}},
                                     {"kv": {"max_bits": 4.0}}])
def test_the_other_methods_budget_and_training_are_refused(section):
    with pytest.raises(ValidationError, match="joint"):
        parse_spec({**BASE, **section})


def test_latency_is_asked_by_the_deployment_and_adds_an_objective():
    joint = methods.get("joint")
    plain = parse_spec(BASE)
    assert plain.deployment.latency is None and plain.asked_objectives() == ()
    assert [o.name for o in joint.objectives_of(plain)] == ["kl", "memory"]
    assert joint.stored_objectives(plain) == joint.stored_objectives()  # defaults unchanged

    asked = parse_spec({**BASE, "deployment": {"context": 100, "latency": True}})
    assert asked.deployment.latency.context == 100  # min(context, 256), resolved into the stored spec
    assert parse_spec({**BASE, "deployment": {"latency": {}}}).deployment.latency.context == 256
    stored = asked.model_dump(mode="json")
    assert parse_spec(stored) == asked and stored["deployment"]["latency"] == {"context": 100, "warmup": 2,
                                                                              "repeats": 5}
    names = [(o.name, o.direction, o.unit) for o in joint.objectives_of(stored)]
    assert names == [("kl", "minimize", "nats"), ("memory", "minimize", "bytes"), ("latency", "minimize", "ms")]
    assert parse_spec({**BASE, "deployment": {"latency": False}}).deployment.latency is None
    assert "one decoding step of batch 1 with the candidate's cache holding 100 tokens" in describe_deployment(stored)


@pytest.mark.parametrize(("latency", "field"), [
    ({"context": 0}, "deployment.latency.context"),
    ({"repeats": 0}, "deployment.latency.repeats"),
    ({"warmup": -1}, "deployment.latency.warmup"),
    ({"budget": 3}, "deployment.latency.budget"),
    ({"context": 5000}, "deployment.latency"),  # more than the deployment's 4096 tokens
    ("yes", "deployment.latency"),
])
def test_bad_latency_settings_are_named(latency, field):
    with pytest.raises(ValidationError) as info:
        parse_spec({**BASE, "deployment": {"latency": latency}})
    assert field in {".".join(map(str, e["loc"])) for e in info.value.errors()}
